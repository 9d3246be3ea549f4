"""Dashboard fixtures: signing in through the login form, and a live gateway for the browser tests."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Gateway

LOGIN_TOKEN = re.compile(r'name="login_token" value="([^"]+)"')
CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


class Dashboard:
    """A gateway's TestClient driven like a browser: sign in with a key, then use the session cookie."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.client = gateway.client
        self.state = gateway.state

    def sign_in(self, role: str, team: str = "compliance") -> str:
        """Sign in with a new key of `role` (replacing any session); returns the key."""
        key = self.gateway.key(role, team=team)
        self.client.cookies.clear()
        response = self.submit_login(key)
        assert response.status_code == 303, response.text
        return key

    def submit_login(self, key: str, next_path: str = "") -> Any:
        form = self.client.get("/dashboard/login")
        token = LOGIN_TOKEN.search(form.text)
        assert token is not None, form.text
        return self.client.post("/dashboard/login", data={"api_key": key, "login_token": token.group(1),
                                                          "next": next_path}, follow_redirects=False)

    def csrf(self, page: str = "/dashboard/models") -> str:
        match = CSRF_META.search(self.client.get(page).text)
        assert match is not None, "no CSRF token on the page: not signed in?"
        return match.group(1)

    def post(self, path: str, data: dict[str, Any], **kwargs: Any) -> Any:
        return self.client.post(path, data={**data, "csrf_token": self.csrf()}, follow_redirects=False,
                                **kwargs)


@pytest.fixture
def dash(gateway: Gateway) -> Dashboard:
    return Dashboard(gateway)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LiveGateway:
    """The gateway app served by uvicorn on a local port (a thread), sharing the fixture's state."""

    def __init__(self, gateway: Gateway) -> None:
        import uvicorn

        from gateway.main import create_app

        self.gateway = gateway
        self.state = gateway.state
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(gateway.state.settings, state=gateway.state)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="live-gateway", daemon=True)

    def __enter__(self) -> LiveGateway:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the live gateway did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def key(self, role: str, team: str = "compliance") -> str:
        return self.gateway.key(role, team=team)


@pytest.fixture
def tiny_gateway(gateway_factory: Callable[..., Gateway], tiny_models: Path) -> Gateway:
    """An embedded gateway whose registry serves the tiny random-weight test models."""
    return gateway_factory(models_dir=tiny_models, default_model="tiny-c2i", rate_limit_per_minute=0)


@pytest.fixture
def live(tiny_gateway: Gateway) -> Iterator[LiveGateway]:
    with LiveGateway(tiny_gateway) as server:
        yield server


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Debian's Chromium driven by Playwright; never a downloaded browser."""
    import os

    if not Path(CHROMIUM).is_file():
        message = f"{CHROMIUM} is missing: install it with `apt-get install -y chromium`"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


@pytest.fixture
def page_for(browser: Any, live: LiveGateway) -> Iterator[Callable[[str], Any]]:
    """`page_for(role)`: a new browser context signed in through the login form with a key of `role`."""
    contexts: list[Any] = []

    def open_page(role: str, team: str = "compliance") -> Any:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(10_000)
        page.goto(f"{live.url}/dashboard/login")
        page.get_by_label("API key").fill(live.key(role, team=team))
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_load_state()
        return page

    yield open_page
    for context in contexts:
        context.close()
