FROM python:3.11-slim
# gcc builds generator/llamagen/gemv.c, the few-row CPU decode kernel, on first use (CPU workers and the
# embedded mode; without it, CPU decode uses the BLAS layouts only).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY gateway gateway
COPY generator generator
COPY policies policies
COPY audit audit
COPY migrations migrations
RUN pip install --no-cache-dir -e .
ENV HF_HUB_OFFLINE=1
EXPOSE 8000
CMD ["llamagen-gateway", "serve", "--host", "0.0.0.0", "--port", "8000"]
