"""Command line: ``relu-atlas serve`` (the API), ``relu-atlas run`` (API + Streamlit UI) and
``relu-atlas convert`` (a torch archive to ONNX, on the user's own machine).

Also ``python -m backend.cli ...``. Settings come from ``ATLAS_*`` environment variables;
``--host``/``--port`` override them.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from backend.config import Settings

ROOT = Path(__file__).resolve().parents[1]


def serve(settings: Settings) -> None:
    import uvicorn

    from backend.main import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level="info", access_log=False, timeout_graceful_shutdown=10)


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(settings: Settings, ui_port: int) -> int:
    """Start the API and the Streamlit frontend; Ctrl-C (or SIGTERM) stops both."""
    signal.signal(signal.SIGINT, _interrupt)  # also when started with SIGINT ignored (&)
    signal.signal(signal.SIGTERM, _interrupt)
    api_url = f"http://{settings.host}:{settings.port}"
    env = {**os.environ, "ATLAS_HOST": settings.host, "ATLAS_PORT": str(settings.port),
           "ATLAS_API_URL": api_url}
    api = subprocess.Popen([sys.executable, "-m", "backend.cli", "serve"], cwd=ROOT, env=env)
    ui = None
    try:
        if not _wait_healthy(api_url, api):
            print("the API did not start; see the log above", file=sys.stderr)
            return 1
        ui = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(ROOT / "frontend" / "app.py"),
             "--server.address", settings.host, "--server.port", str(ui_port),
             "--server.headless", "true", "--browser.gatherUsageStats", "false"],
            cwd=ROOT, env=env)
        print(f"\nReLU Atlas is running:\n  UI:  http://{settings.host}:{ui_port}\n"
              f"  API: {api_url}/docs\nPress Ctrl-C to stop.\n", flush=True)
        while api.poll() is None and ui.poll() is None:
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for proc in (ui, api):
            if proc is not None and proc.poll() is None:
                proc.terminate()  # both shut down gracefully on SIGTERM
        for proc in (ui, api):
            if proc is not None:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()


def convert(source: Path, input_shape: str | None, output: Path | None) -> int:
    """Convert a TorchScript or .pt2 archive to ONNX. TorchScript runs code from the file,
    which is why the service refuses it: run this only on files you trust."""
    from app import UnsupportedModelError
    from app.loaders import load_onnx
    from app.loaders.torch_loader import archive_to_onnx

    shape = tuple(int(s) for s in input_shape.replace("x", ",").split(",")) \
        if input_shape else None
    output = output or source.with_suffix(".onnx")
    try:
        data = archive_to_onnx(source, shape, allow_torchscript=True)
        net = load_onnx(data, name=source.stem)
    except UnsupportedModelError as exc:
        print(f"cannot convert {source}: {exc}", file=sys.stderr)
        return 1
    output.write_bytes(data)
    print(f"wrote {output}: input {tuple(net.input_shape)}, {net.num_outputs} outputs")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line (also used by the test that checks docker-compose.yml's commands)."""
    parser = argparse.ArgumentParser(prog="relu-atlas", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("serve", "start the API"), ("run", "start the API and the web UI")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--host", help="bind address (default 127.0.0.1)")
        p.add_argument("--port", type=int, help="API port (default 8000)")
        if name == "run":
            p.add_argument("--ui-port", type=int, default=8501, help="web UI port")
    p = sub.add_parser("convert", help="convert a TorchScript or .pt2 file you trust to ONNX")
    p.add_argument("source", type=Path, help="the .pt / .pt2 file")
    p.add_argument("--input-shape", help="input shape without batch, e.g. 1,28,28")
    p.add_argument("-o", "--output", type=Path, help="the .onnx to write (default: beside it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "convert":
        return convert(args.source, args.input_shape, args.output)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = Settings(**overrides)
    try:
        tokens = settings.token_owners()
    except ValueError as exc:
        parser.error(str(exc))
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not tokens:
        parser.error(f"refusing to bind {settings.host} without ATLAS_API_TOKEN "
                     "or ATLAS_API_TOKENS")
    if args.command == "serve":
        serve(settings)
        return 0
    return run(settings, args.ui_port)


if __name__ == "__main__":
    sys.exit(main())
