"""The `llamagen-gateway` command."""

from __future__ import annotations

import argparse
import getpass
import importlib
import logging
import os
import sys
from pathlib import Path

from gateway.settings import get_settings
from generator.logs import configure_logging

SUBCOMMAND_MODULES = ("gateway.commands.policy", "gateway.commands.audit", "gateway.commands.provenance")


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.main import create_app
    from gateway.state import build_state, close_state

    settings = get_settings()
    configure_logging(settings.log_json)
    if settings.embedded:
        _configure_embedded_runtime(settings.torch_threads)
    mode = "embedded (in-process worker)" if settings.embedded else f"distributed (broker {settings.broker_url})"
    logging.getLogger("gateway").info("starting gateway on %s:%s, %s", args.host, args.port, mode)
    # Built before the server starts, so a bad policy file, model card or key stops it with a plain message
    # (main) rather than a traceback from inside the ASGI lifespan.
    state = build_state(settings)
    try:
        uvicorn.run(create_app(settings, state=state, warm=True), host=args.host, port=args.port,
                    log_config=None, access_log=False)
    finally:
        close_state(state)
    return 0


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is outside 1-65535")
    return port


def _configure_embedded_runtime(requested: int) -> None:
    """The served embedded gateway runs torch in its request threads (screening) while it samples: size
    torch's CPU threads for sharing the cores (`generator.sampler.torch_threads`)."""
    from generator.llamagen import configure_runtime
    from generator.sampler import torch_threads

    configure_runtime(num_threads=torch_threads(requested))


def cmd_worker(args: argparse.Namespace) -> int:
    settings = get_settings()
    if settings.embedded:
        print("error: LLAMAGEN_GATEWAY_BROKER_URL is not set; the embedded gateway runs its own worker",
              file=sys.stderr)
        return 2
    configure_logging(settings.log_json)
    from generator.celery_app import GPU_QUEUE, app

    concurrency = args.concurrency or settings.worker_concurrency
    if settings.worker_metrics_port and args.pool == "prefork" and concurrency > 1:
        print(f"error: LLAMAGEN_GATEWAY_WORKER_METRICS_PORT={settings.worker_metrics_port}: each of the "
              f"{concurrency} prefork processes would serve its metrics on that one port; run one process per "
              "port (--concurrency 1, as compose does, or --pool solo) or unset it", file=sys.stderr)
        return 2
    # Celery leaves logging as configured here (generator.celery_app); --quiet drops its text banner from JSON logs.
    argv = ["--quiet"] if settings.log_json else []
    argv += ["worker", "-Q", args.queues or GPU_QUEUE, "--concurrency", str(concurrency), "--pool", args.pool,
            "--loglevel", args.loglevel, "--without-gossip", "--without-mingle"]
    if args.hostname:
        argv += ["--hostname", args.hostname]
    app.worker_main(argv)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from audit.db import upgrade_database

    settings = get_settings()
    if settings.database_url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_database(settings.database_url)
    print(f"database at {settings.database_url.split('@')[-1]} is at the latest schema")
    return 0


def cmd_dev_setup(args: argparse.Namespace) -> int:
    """Embedded development set-up: the development CA and a development admin key (kept under DATA_DIR)."""
    from audit.db import make_engine, make_session_factory
    from audit.provenance import ensure_dev_ca
    from gateway.auth import authenticate, create_key
    from gateway.errors import Unauthorized

    settings = get_settings()
    if settings.env != "dev":
        print("error: dev-setup is for LLAMAGEN_GATEWAY_ENV=dev only", file=sys.stderr)
        return 2
    if settings.uses_dev_ca:
        ca = ensure_dev_ca(settings.dev_ca_dir)
        print(f"development-only signing CA (not for production): {ca.chain_pem_path}")
    key_file = settings.data_dir / "DEV-ONLY-api-key.txt"
    sessions = make_session_factory(make_engine(settings.database_url))
    with sessions() as session, session.begin():
        token = key_file.read_text().strip() if key_file.is_file() else ""
        try:
            authenticate(session, token)
        except Unauthorized:
            token = create_key(session, role="admin", team="dev", name="development key (make run)",
                               created_by="dev-setup")
            key_file.write_text(token + "\n")
            key_file.chmod(0o600)
    print(f"development API key (role admin, team dev; also in {key_file}):")
    print(token)
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    from audit.db import make_engine, make_session_factory
    from gateway.auth import create_key

    settings = get_settings()
    sessions = make_session_factory(make_engine(settings.database_url))
    try:
        with sessions() as session, session.begin():
            token = create_key(session, role=args.role, team=args.team, name=args.name,
                               created_by=f"cli:{getpass.getuser()}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"created a {args.role} key for team {args.team}; it is shown once and stored only as a hash:")
    print(token)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from audit.db import make_engine, make_session_factory
    from gateway.auth import revoke_key
    from gateway.errors import NotFound

    sessions = make_session_factory(make_engine(get_settings().database_url))
    try:
        with sessions() as session, session.begin():
            revoke_key(session, args.key_id, revoked_by=f"cli:{getpass.getuser()}")
    except NotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"revoked key {args.key_id}")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from generator.registry import Registry

    settings = get_settings()
    cards = Registry(settings.models_dir).cards()
    if not cards:
        print(f"no model cards under {settings.models_dir}")
    for card in cards:
        state = "servable" if card.servable else "card only (weights not installed)"
        print(f"{card.name:28} {card.task:4} v{card.version:8} {state}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """One governed generation from the shell: the full pipeline, in-process."""
    from gateway.auth import Principal
    from gateway.errors import ApiError
    from gateway.schemas import GenerationCreate
    from gateway.services import get_generation, submit_generation
    from gateway.state import build_state, close_state

    settings = get_settings()
    configure_logging(json_logs=False, level=logging.WARNING)
    try:
        request = GenerationCreate.model_validate({
            "model": args.model, "prompt": args.prompt, "class_id": args.class_id,
            "params": {k: v for k, v in {"seed": args.seed, "cfg_scale": args.cfg_scale,
                                          "num_images": args.num_images}.items() if v is not None}})
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.output)
    problem = ("is a directory" if out.is_dir() else "its folder does not exist" if not out.parent.is_dir()
               else "its folder is not writable" if not os.access(out.parent, os.W_OK) else None)
    if problem:  # said before generating: a run whose image cannot be written would only fill the audit log
        print(f"error: -o {out}: {problem}", file=sys.stderr)
        return 2
    # One run, nothing else in this process: it samples in process (a sampler process would only add its start).
    state = build_state(settings.model_copy(update={"broker_url": None, "sampler_process": False}))
    principal = Principal(key_id=f"cli:{getpass.getuser()}", role="creator", team=args.team)
    try:
        job = submit_generation(state=state, principal=principal, request=request, request_id="cli")
        state.dispatcher.drain(timeout=args.timeout)  # type: ignore[attr-defined]
        with state.ctx.sessions() as session:
            job = get_generation(session=session, principal=principal, job_id=job.id)
            print(f"generation {job.id}: {job.status} (policy {job.policy_revision})")
            if job.error:
                print(f"  {job.error}")
            for image in job.images:
                target = out if len(job.images) == 1 else out.with_stem(f"{out.stem}-{image['index']}")
                try:
                    target.write_bytes(state.ctx.artifacts.get(image["uri"]))
                except OSError as exc:
                    print(f"error: cannot write {target}: {exc.strerror or exc}; the image is stored and audited "
                          f"as {image['uri']}", file=sys.stderr)
                    return 1
                print(f"  wrote {target} (sha256 {image['sha256'][:16]}…, C2PA manifest {image['manifest_id']})")
        return 0 if job.status == "completed" else 1
    except ApiError as exc:
        print(f"{exc.code}: {exc.message}", file=sys.stderr)
        return 1
    finally:
        close_state(state)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamagen-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gateway (embedded worker unless a broker is configured)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run a Celery GPU worker (queue gpu)")
    p.add_argument("--concurrency", type=int, default=None)
    p.add_argument("-Q", "--queues", default=None, help="queues to consume (default: gpu)")
    p.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"],
                   help="prefork (default) enforces the job time limit: it kills a job's process past the limit "
                        "and starts a new one; solo and threads cannot stop a running job")
    p.add_argument("--loglevel", default="INFO")
    p.add_argument("--hostname", default=None)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("migrate", help="upgrade the database to the latest schema")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("dev-setup", help="embedded mode: development CA and a development API key")
    p.set_defaults(func=cmd_dev_setup)

    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    p = keys.add_parser("create", help="create a key; prints it on the last line")
    p.add_argument("--role", required=True, choices=["creator", "reviewer", "auditor", "policy_admin", "admin"])
    p.add_argument("--team", required=True)
    p.add_argument("--name", default="")
    p.set_defaults(func=cmd_keys_create)
    p = keys.add_parser("revoke", help="revoke a key by its id")
    p.add_argument("key_id")
    p.set_defaults(func=cmd_keys_revoke)

    models = sub.add_parser("models", help="model cards").add_subparsers(dest="models_command", required=True)
    p = models.add_parser("list", help="list model cards")
    p.set_defaults(func=cmd_models_list)

    p = sub.add_parser("generate", help="one governed generation from the shell (full pipeline)")
    p.add_argument("--model", default=None)
    p.add_argument("--prompt", default=None)
    p.add_argument("--class-id", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--cfg-scale", type=float, default=None)
    p.add_argument("--num-images", type=int, default=None)
    p.add_argument("--team", default="cli")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("-o", "--output", default="generation.png")
    p.set_defaults(func=cmd_generate)

    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except _user_errors() as exc:  # evaluated only when something is raised: the imports cost nothing otherwise
        print(f"error: {_describe(exc)}", file=sys.stderr)
        return 2
    except ValidationError as exc:  # settings from the environment: name the variable, no traceback
        for err in exc.errors():
            name = "LLAMAGEN_GATEWAY_" + "_".join(str(p) for p in err["loc"]).upper()
            print(f"configuration error: {name}: {err['msg']}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    """Faults in what the operator gave (files, settings, the database they named): a message, not a traceback."""
    from sqlalchemy.exc import OperationalError

    from audit.dev_ca import DevCAError
    from audit.verify import ExportFileError
    from generator.registry import RegistryError
    from policies.loader import PolicyError
    from policies.replay import ReplayError

    return (PolicyError, RegistryError, ReplayError, ExportFileError, DevCAError, OperationalError)


def _describe(exc: BaseException) -> str:
    from sqlalchemy.exc import OperationalError

    from audit.db import describe_fault

    if isinstance(exc, OperationalError):
        return f"{describe_fault(exc).message} ({str(exc.orig).strip() or type(exc.orig).__name__})"
    return str(exc)


if __name__ == "__main__":
    sys.exit(main())
