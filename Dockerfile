FROM python:3.11-slim
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
