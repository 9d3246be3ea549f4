"""Alembic environment: metadata from `audit.db.Base`; the URL from the config or `-x url=...`."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

import audit.models  # noqa: F401  (registers every table on Base.metadata)
from audit.db import Base, make_engine

config = context.config
# Programmatic runs (upgrade_database) configure logging themselves; only the plain CLI reads the ini.
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def database_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("no database URL: run `llamagen-gateway migrate`, "
                         "or `alembic -x url=sqlite:///var/gateway.db upgrade head`")
    return url


def run_migrations_offline() -> None:
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(database_url())
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
