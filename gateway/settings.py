"""The one settings object. The only module that reads environment variables; it imports nothing of ours."""

from __future__ import annotations

import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_SECRETS = {"", "changeme", "change-me", "secret", "dev"}
# File names of the development CA that `audit.provenance.ensure_dev_ca` writes under DATA_DIR/dev-ca.
DEV_CHAIN_FILE = "DEV-ONLY-signing-chain.pem"
DEV_KEY_FILE = "DEV-ONLY-signing-key.pem"
DEV_ROOT_FILE = "DEV-ONLY-root-ca.pem"


class Settings(BaseSettings):
    """Gateway, worker and CLI configuration; defaults give the embedded mode."""

    model_config = SettingsConfigDict(env_prefix="LLAMAGEN_GATEWAY_", env_file=".env", extra="ignore")

    env: Literal["dev", "test", "prod"] = Field("dev", description="dev allows development-only secrets")
    data_dir: Path = Field(Path("./var"), description="SQLite file, artifacts and development CA")
    database_url: str = Field("", description="SQLAlchemy URL; default sqlite:///$DATA_DIR/gateway.db")
    broker_url: str | None = Field(None, description="redis://... sends jobs to Celery workers")
    result_backend_url: str | None = Field(None, description="Celery result backend; default: the broker")
    artifact_url: str = Field("", description="file://... or s3://bucket/prefix")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://minio:9000")
    models_dir: Path = Field(Path("./models"), description="model cards and checkpoints")
    default_model: str = Field("demo-shapes-t2i", description="model used when a request names none")
    policy_file: Path = Field(
        Path(__file__).resolve().parent.parent / "policies" / "rules" / "default.yaml",
        description="policy loaded at first start",
    )
    signing_cert: Path | None = Field(None, description="organisation chain PEM, leaf first")
    signing_key: Path | None = Field(None, description="private key PEM of the leaf")
    signing_alg: Literal["ES256", "PS256", "Ed25519"] = "ES256"
    trust_anchors: Path | None = Field(None, description="PEM bundle of trusted C2PA roots")
    device: str = Field("auto", description="auto picks CUDA when present")
    torch_threads: int = Field(0, ge=0, le=256, description="CPU threads per torch call in a served embedded "
                               "gateway; 0: half the cores (the sampler and the screening classifiers "
                               "run side by side)")
    decode_layout: str = Field("auto", description="how CPU float32 GPT weights are held for decode: auto times "
                               "each layout at load and keeps the fastest; or pin one, e.g. 'plain', 'streaming, "
                               "packed from 3 rows', 'plain, gemv.c up to 16 rows' (generator/llamagen/layout.py)")
    sampler_process: bool = Field(True, description="embedded mode: sample in a child process, so that sampling "
                                  "never waits for the GIL behind request threads (false: in a worker thread)")
    worker_batch_size: int = Field(8, ge=1, le=64, description="dynamic batching: jobs per sampling run")
    worker_batch_wait_ms: int = Field(20, ge=0, le=5000, description="how long a worker waits to fill a batch")
    worker_concurrency: int = Field(1, ge=1, le=64)
    worker_metrics_port: int | None = Field(None, ge=1, le=65535, description="Prometheus port of a worker")
    worker_start_timeout_s: int = Field(600, ge=4, description="how long a new worker process may take to load "
                                        "its models before Celery gives up on it and starts another")
    job_time_limit_s: int = Field(600, ge=5, description="hard limit per job; also the running-job lease")
    job_max_attempts: int = Field(5, ge=1, le=100, description="claims of one job (worker deaths, time limits, "
                                  "faults): past this it fails instead of being run again")
    requeue_after_s: float = Field(60.0, gt=0, description="re-send a job still queued after this long")
    broker_visibility_timeout_s: int | None = Field(None, ge=5, description="redelivery of unacked jobs")
    checkpoint_interval_s: float = Field(60.0, gt=0, le=3600)
    max_prompt_chars: int = Field(2000, ge=1)
    max_images_per_request: int = Field(4, ge=1, le=16)
    max_json_body_bytes: int = Field(1024 * 1024, ge=1, description="bodies to the JSON routes (any Content-Type) "
                                     "over this are refused (413) before they are read whole")
    rate_limit_per_minute: int = Field(120, ge=0, description="requests per key per minute; 0 disables")
    team_rate_limit_per_minute: int = Field(0, ge=0, description="requests per team per minute; 0 disables")
    team_quota_per_day: int = Field(10000, ge=0, description="images per team per day; 0 disables")
    key_quota_per_day: int = Field(0, ge=0, description="images per key per day; 0 disables")
    session_secret: SecretStr = Field(SecretStr("dev"), description="signs dashboard session cookies")
    log_json: bool = True
    uses_dev_ca: bool = Field(False, description="set when the development CA stands in for the org chain")

    @field_validator("decode_layout")
    @classmethod
    def _known_layout(cls, value: str) -> str:
        if value != "auto":
            from generator.llamagen.layout import DecodeLayout

            DecodeLayout.parse(value)  # ValueError: pydantic names the setting
        return value

    @field_validator("data_dir", "models_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @model_validator(mode="after")
    def _derive_defaults(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'gateway.db'}"
        if not self.artifact_url:
            self.artifact_url = (self.data_dir / "artifacts").as_uri()
        if self.env != "dev" and self.session_secret.get_secret_value() in PLACEHOLDER_SECRETS:
            raise ValueError("LLAMAGEN_GATEWAY_SESSION_SECRET must be set outside env=dev")
        if (self.signing_cert is None) != (self.signing_key is None):
            raise ValueError("set both LLAMAGEN_GATEWAY_SIGNING_CERT and LLAMAGEN_GATEWAY_SIGNING_KEY, or neither")
        if self.signing_cert is None:
            # The embedded default: a development CA created on first start (never for production).
            self.uses_dev_ca = True
            self.signing_cert = self.dev_ca_dir / DEV_CHAIN_FILE
            self.signing_key = self.dev_ca_dir / DEV_KEY_FILE
            if self.trust_anchors is None:
                self.trust_anchors = self.dev_ca_dir / DEV_ROOT_FILE
        return self

    @property
    def embedded(self) -> bool:
        """True when generation runs in-process (no broker configured)."""
        return not self.broker_url

    @property
    def dev_ca_dir(self) -> Path:
        return self.data_dir / "dev-ca"


DEV_SESSION_SECRET_FILE = "dev-session-secret"


def with_dev_session_secret(settings: Settings) -> Settings:
    """In env=dev with a placeholder session secret, a random one kept under DATA_DIR (made once, owner-only):
    with the placeholder anyone could sign a dashboard cookie for any key id, and key ids are not secret."""
    if settings.env != "dev" or settings.session_secret.get_secret_value() not in PLACEHOLDER_SECRETS:
        return settings
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    path = settings.data_dir / DEV_SESSION_SECRET_FILE
    secret = path.read_text().strip() if path.exists() else ""
    if len(secret) < 32:  # none yet (or emptied): make one, whole or not at all
        draft = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
        try:
            if path.exists():  # emptied: replace it
                os.replace(draft, path)
            else:
                os.link(draft, path)  # another process of this gateway starting now may have won: use its
        except FileExistsError:
            pass
        finally:
            draft.unlink(missing_ok=True)
        secret = path.read_text().strip()
    return settings.model_copy(update={"session_secret": SecretStr(secret)})


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; tests call `get_settings.cache_clear()` after changing the environment."""
    return Settings()
