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
RUN pip install --no-cache-dir -e . && python -m compileall -q gateway generator policies audit migrations
# Not root: the services run as `gateway` (uid 10001), whose home is the data volume (the compose file's
# gateway-data starts out owned by it) and holds the built decode kernel. Secrets mounted from files keep their
# host owner and mode: make key.pem readable by uid 10001, e.g. `chown 10001 secrets/key.pem`.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /var/lib/llamagen-gateway gateway
USER gateway
ENV HF_HUB_OFFLINE=1
EXPOSE 8000
CMD ["llamagen-gateway", "serve", "--host", "0.0.0.0", "--port", "8000"]
