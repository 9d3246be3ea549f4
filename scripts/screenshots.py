"""Screenshots of the dashboard's main pages for the README, taken in Debian's Chromium.

Starts an embedded gateway on a temporary data directory, fills it with a month of synthetic but chained
audit history (bench/dashboard.py's generator), a few review items and a signed image, and a tiny servable
model card; then signs in with one key per role and saves PNGs under docs/screenshots/.

    .venv/bin/python scripts/screenshots.py [--out docs/screenshots] [--events 3000]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

log = logging.getLogger("screenshots")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def build_gateway(data_dir: Path, events: int) -> Any:
    """A live embedded gateway with history to show; returns tests.dashboard.conftest.LiveGateway."""
    from audit.db import make_engine, make_session_factory, upgrade_database
    from bench.dashboard import seed
    from gateway.settings import Settings
    from gateway.state import build_state
    from generator.registry import Registry
    from tests.conftest import Gateway
    from tests.dashboard import factories
    from tests.dashboard.conftest import LiveGateway
    from tests.factories import write_tiny_model

    models_dir, model = REPO / "models", {}
    if not Registry(models_dir).cards():  # no model cards in this checkout yet: show a tiny one
        models_dir, model = data_dir / "models", {"default_model": "tiny-c2i"}
        write_tiny_model(models_dir, "tiny-c2i", "c2i")
    settings = Settings(_env_file=None, env="test", data_dir=data_dir / "var", models_dir=models_dir,
                        session_secret="screenshots-session-secret", log_json=False, device="cpu",
                        rate_limit_per_minute=0, **model)
    settings.data_dir.mkdir(parents=True)
    upgrade_database(settings.database_url)
    state = build_state(settings)
    revision = state.ctx.policies.active_revision().revision
    seed(make_session_factory(make_engine(settings.database_url)), events, revision)
    factories.park_for_review(state, team="ads", prompt="a portrait of a famous senator shaking hands")
    factories.park_for_review(state, team="retail", prompt="a cartoon mouse with round ears on a T-shirt",
                              rule_id="trademarks")
    if model:  # only the tiny random-weight stand-in: a signed placeholder image
        factories.released_image(state, team="design", prompt="a small red square on white")
    else:  # the shipped demo model: a real governed generation, screened, signed and audited
        _generate(state, "a small red star above a large blue circle on a white background")
    state.checkpoints.tick(force=True)
    return LiveGateway(Gateway(client=None, state=state))


def _generate(state: Any, prompt: str) -> None:
    from gateway.auth import Principal
    from gateway.schemas import GenerationCreate
    from gateway.services import submit_generation

    request = GenerationCreate.model_validate({"model": "demo-shapes-t2i", "prompt": prompt,
                                               "params": {"seed": 7}})
    submit_generation(state=state, principal=Principal(key_id="creator0002", role="creator", team="design"),
                      request=request, request_id="screenshots")
    state.dispatcher.drain(timeout=300)


def sign_in(browser: Any, live: Any, role: str) -> Any:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
    page = context.new_page()
    page.set_default_timeout(20_000)
    page.goto(f"{live.url}/dashboard/login")
    page.get_by_label("API key").fill(live.key(role))
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_load_state()
    return page


def shoot(page: Any, out: Path, name: str) -> None:
    page.wait_for_load_state("networkidle")
    path = out / f"{name}.png"
    page.screenshot(path=str(path), full_page=False)
    log.info("wrote %s", path.relative_to(REPO) if path.is_relative_to(REPO) else path)


def take(live: Any, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    from tests.dashboard import factories

    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        login = browser.new_page(viewport={"width": 1280, "height": 700})
        login.goto(f"{live.url}/dashboard/login")
        shoot(login, out, "sign-in")

        auditor = sign_in(browser, live, "auditor")
        auditor.goto(f"{live.url}/dashboard/overview?window=30d")
        auditor.wait_for_timeout(500)  # charts draw after load
        shoot(auditor, out, "overview")
        auditor.goto(f"{live.url}/dashboard/audit?action=prompt.screened&rule=public_figures")
        shoot(auditor, out, "audit-log")
        auditor.goto(f"{live.url}/dashboard/audit?action=image.released&model=demo-shapes-t2i")
        auditor.locator("#results").get_by_role("link", name="image.released").first.click()
        shoot(auditor, out, "audit-event")

        reviewer = sign_in(browser, live, "reviewer")
        shoot(reviewer, out, "review-queue")

        admin = sign_in(browser, live, "policy_admin")
        source = str(live.state.ctx.policies.active_revision().source)
        admin.goto(f"{live.url}/dashboard/policies/edit")
        admin.get_by_label("Policy YAML").fill(source.replace("    limit: 2000", "    limitt: 2000"))
        admin.get_by_role("button", name="Validate").click()
        admin.get_by_role("alert").wait_for()
        shoot(admin, out, "policy-editor-error")
        admin.get_by_label("Policy YAML").fill(source.replace('version: "1.2.1"', 'version: "1.2.2"')
                                               .replace("limit: 2000", "limit: 1500"))
        admin.get_by_label("Reason for this revision").fill("shorter prompts for the ads team")
        admin.get_by_role("button", name="Save revision").click()
        admin.goto(f"{live.url}/dashboard/policies")
        admin.get_by_role("button", name="Compare").click()
        shoot(admin, out, "policy-diff")
        cards = live.state.ctx.registry.cards()
        richest = max(cards, key=lambda card: (len(card.lineage), len(card.advisories)))
        admin.goto(f"{live.url}/dashboard/models/{richest.name}")
        shoot(admin, out, "model-card")

        creator = sign_in(browser, live, "creator")
        creator.goto(f"{live.url}/dashboard/provenance")
        signed = out.parent / ".signed-sample.png"
        _, event_id = factories.released_image(live.state, team="design")
        signed.write_bytes(live.state.ctx.artifacts.get(_artifact_uri(live, event_id)))
        creator.get_by_label("Image file").set_input_files(str(signed))
        creator.get_by_role("button", name="Verify").click()
        creator.get_by_role("heading", name="Report for .signed-sample.png").wait_for()
        signed.unlink()
        shoot(creator, out, "provenance")
        browser.close()


def _artifact_uri(live: Any, event_id: str) -> str:
    from sqlalchemy import select

    from audit.models import AuditEvent, Job

    with live.state.ctx.sessions() as session:
        event = session.scalar(select(AuditEvent).where(AuditEvent.id == event_id))
        assert event is not None and event.job_id is not None
        job = session.get(Job, event.job_id)
        assert job is not None
        return str(job.images[0]["uri"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    parser.add_argument("--events", type=int, default=3000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("gateway").setLevel(logging.WARNING)  # no access log lines among the file names
    if not Path(CHROMIUM).is_file():
        raise SystemExit(f"{CHROMIUM} is missing: apt-get install -y chromium")
    from gateway.state import close_state

    with tempfile.TemporaryDirectory(prefix="screenshots-") as tmp:
        live = build_gateway(Path(tmp), args.events)
        with live:
            take(live, args.out.resolve())
        close_state(live.state)


if __name__ == "__main__":
    main()
