"""End-to-end fixtures: the real backend and Streamlit frontend, driven by headless chromium.

``atlas`` starts ``python -m backend.cli serve`` and ``streamlit run frontend/app.py`` once per
session on free loopback ports with a temporary data directory; ``page`` is a fresh browser
tab and ``ui`` wraps it with the waits and screenshots a browser test needs, so a browser test
per page needs only ``ui`` (and ``atlas`` for the API, as an oracle's data source).
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
SAMPLE_MODELS = ROOT / "sample_models"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
START_TIMEOUT_S = 180


def sample_model(name: str) -> tuple[Path, str]:
    """``(path, model id)`` of ``sample_models/<name>.onnx``; skips the test until it is built.

    The id is the file's sha256, which is how the backend names an uploaded model.
    """
    path = SAMPLE_MODELS / f"{name}.onnx"
    if not path.exists():
        pytest.skip("sample models not built")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class Atlas:
    """Where the running app is: the API (for oracles) and the UI (for the browser)."""

    api_url: str
    ui_url: str
    data_dir: Path

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=f"{self.api_url}/api", timeout=30)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start a server in its own process group, so teardown also ends its workers."""
    with log.open("wb") as out:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {START_TIMEOUT_S} s:\n{log.read_text()}")


def _stop(proc: subprocess.Popen) -> None:
    """Ask the server to shut down (it stops its own workers), then kill any stragglers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture(scope="session")
def atlas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Atlas]:
    """The real backend and frontend, started once per test session."""
    tmp = tmp_path_factory.mktemp("atlas")
    api_port, ui_port = _free_port(), _free_port()
    api_url, ui_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{ui_port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ATLAS_DATA_DIR": str(tmp / "data"),
           "ATLAS_HOST": "127.0.0.1", "ATLAS_PORT": str(api_port), "ATLAS_API_URL": api_url,
           "ATLAS_DASK_WORKERS": "1"}
    env.pop("ATLAS_DATABASE_URL", None)
    env.pop("ATLAS_DASK_SCHEDULER_ADDRESS", None)
    procs: list[subprocess.Popen] = []
    try:
        backend_log = tmp / "backend.log"
        procs.append(_start([sys.executable, "-m", "backend.cli", "serve"], env, backend_log))
        _wait_ready(f"{api_url}/api/health", procs[-1], backend_log)
        ui_log = tmp / "frontend.log"
        procs.append(_start([
            sys.executable, "-m", "streamlit", "run", "frontend/app.py",
            "--server.headless=true", f"--server.port={ui_port}",
            "--server.address=127.0.0.1", "--browser.gatherUsageStats=false",
            "--server.fileWatcherType=none",
        ], env, ui_log))
        _wait_ready(f"{ui_url}/_stcore/health", procs[-1], ui_log)
        yield Atlas(api_url=api_url, ui_url=ui_url, data_dir=tmp / "data")
    finally:
        for proc in reversed(procs):
            _stop(proc)


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    """Debian's chromium under Playwright (never a downloaded browser build)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, atlas: Atlas) -> Iterator[object]:
    """A fresh tab (own cookies and session) with a desktop-sized viewport."""
    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    context.set_default_timeout(60_000)
    tab = context.new_page()
    yield tab
    context.close()


class Ui:
    """Small helpers over a Playwright tab pointed at the running frontend."""

    def __init__(self, page, atlas: Atlas) -> None:
        self.page = page
        self.atlas = atlas

    def open(self, url_path: str = "", **query: str) -> None:
        """Load a page of the app (``url_path`` as in frontend/catalog.py) and wait for it."""
        url = f"{self.atlas.ui_url}/{url_path}"
        if query:
            url += "?" + urlencode(query)
        self.page.goto(url)
        self.wait_idle()

    def open_sample(self, url_path: str, name: str, **query: str) -> tuple[Path, str]:
        """Open a page on the sample model ``name`` (see ``sample_model``); its path and id."""
        path, model_id = sample_model(name)
        self.open(url_path, model=model_id, **query)
        return path, model_id

    def click_run(self, key: str) -> None:
        """Press the Run button of the job widget ``run_job(..., key=key)``, not whichever Run
        button happens to render first on a page with several job widgets."""
        self.page.locator(f".st-key-run_{key}").get_by_role("button", name="Run").click()

    def wait_idle(self, timeout_ms: int = 60_000) -> None:
        """Wait until Streamlit has rendered and finished the current script run."""
        self.page.wait_for_selector("[data-testid='stSidebar']", timeout=timeout_ms)
        self.page.wait_for_function(
            "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')",
            timeout=timeout_ms,
        )

    def query_params(self) -> dict[str, str]:
        """The current URL's query parameters (the app keeps model, input and job there)."""
        query = urlsplit(self.page.url).query
        return {k: v[0] for k, v in parse_qs(query).items()}

    def screenshot(self, name: str) -> Path:
        """Save ``tests/artifacts/<name>.png`` (git-ignored) showing the whole page.

        Streamlit scrolls inside its main and sidebar panes, so the viewport is stretched to
        their content's height for the shot.
        """
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        size = self.page.viewport_size
        height = self.page.evaluate(
            "() => Math.max(...['stMain', 'stSidebarContent'].map(id =>"
            " document.querySelector(`[data-testid=${id}]`)?.scrollHeight || 0))"
        )
        self.page.set_viewport_size({"width": size["width"], "height": max(height, size["height"])})
        self.wait_idle()
        self.page.wait_for_function(  # plotly draws its charts after the run has finished
            "() => [...document.querySelectorAll('[data-testid=\"stPlotlyChart\"]')]"
            ".every(chart => chart.querySelector('.main-svg'))"
        )
        self.page.screenshot(path=str(path))
        self.page.set_viewport_size(size)
        return path


@pytest.fixture
def ui(page, atlas: Atlas) -> Ui:
    return Ui(page, atlas)
