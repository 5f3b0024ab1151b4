"""A real stack for the console: the scheduler from `build_scheduler` with mTLS from the demo PKI,
two real agents (on-prem and cloud zone) running a recording pipeline, and `facefleet console`'s
app served by uvicorn on a free port. Browser tests drive Debian's Chromium through Playwright."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import uvicorn

from facefleet.config import ConsoleConfig, Settings
from facefleet.console import tokens
from facefleet.console.app import create_app
from tests.fixtures.ports import free_port
from tests.integration.test_security_e2e import Cluster, RecordingPipeline

CHROMIUM = os.environ.get("FACEFLEET_CHROMIUM", "/usr/bin/chromium")
# As the machine notes say: without the background-networking flags Chromium keeps dialling out.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class ConsoleStack:
    cluster: Cluster
    onprem: RecordingPipeline
    cloud: RecordingPipeline
    settings: Settings
    url: str
    secret: bytes
    artifacts: Path

    def sign_in_url(self, *roles: str, subject: str = "alice", path: str = "/") -> str:
        separator = "&" if "?" in path else "?"
        return f"{self.url}{path}{separator}token={tokens.mint(self.secret, subject, list(roles), ttl_s=600)}"

    def shot(self, page: object, name: str) -> Path:
        path = self.artifacts / f"console-{name}.png"
        page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]
        return path


def _serve(settings: Settings) -> tuple[uvicorn.Server, threading.Thread]:
    host, port = settings.console.listen.rsplit(":", 1)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host=host, port=int(port), log_level="warning"))
    thread = threading.Thread(target=server.run, name="console", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the console did not start")
        time.sleep(0.05)
    return server, thread


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleStack]:
    root = tmp_path_factory.mktemp("console")
    pki = root / "pki"
    from facefleet.security import certs

    certs.init_demo_pki(pki)
    cluster = Cluster(root, pki)
    onprem, cloud = RecordingPipeline(engine="onnx"), RecordingPipeline(engine="onnx")  # ID similarity measured
    cluster.start_agent("onprem-1", "onprem-a", "private", onprem)
    cluster.start_agent("cloud-1", "cloud-a", "cloud", cloud)
    settings = cluster.settings.model_copy(
        update={
            "scheduler": cluster.settings.scheduler.model_copy(update={"listen": cluster.address}),
            "console": ConsoleConfig(listen=f"127.0.0.1:{free_port()}", secret_file=root / "console-secret"),
        }
    )
    server, thread = _serve(settings)
    artifacts = Path(os.environ.get("FACEFLEET_CONSOLE_ARTIFACTS", root / "screenshots"))
    artifacts.mkdir(parents=True, exist_ok=True)
    print(f"\nconsole screenshots: {artifacts}")
    try:
        yield ConsoleStack(
            cluster,
            onprem,
            cloud,
            settings,
            f"http://{settings.console.listen}",
            tokens.load_secret(settings),
            artifacts,
        )
    finally:
        onprem.gate.set()
        cloud.gate.set()
        server.should_exit = True
        thread.join(10)
        cluster.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: scripts/install-deps installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session
