"""docker-compose.yml and the Dockerfile, checked without a container engine.

Every service built from the project image must run a real entry point: the project's own
console script (parsed by its real argument parser), or a console script of an installed
dependency (``dask``, ``streamlit``) whose click command accepts the exact arguments.
"""

from __future__ import annotations

import re
import tomllib
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path

import click
import pytest
import yaml

from backend.config import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
PROJECT_SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def _load(target: str):
    module, _, attr = target.partition(":")
    return getattr(import_module(module), attr)


def _installed_script(name: str) -> str:
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == name] or [None]
    assert ep is not None, f"no installed console script '{name}'"
    return ep.value


def _check_click(command: click.Command, args: list[str]) -> None:
    """Parse ``args`` as the real CLI would, descending into subcommands; raises on misuse."""
    if isinstance(command, click.Group):
        ctx = command.make_context(command.name or "cli", [], resilient_parsing=True)
        sub = command.get_command(ctx, args[0])
        assert sub is not None, f"unknown subcommand '{args[0]}'"
        _check_click(sub, args[1:])
    else:
        command.make_context(command.name or "cli", list(args))


def _check_command(argv: list[str]) -> None:
    program, args = argv[0], argv[1:]
    if program in PROJECT_SCRIPTS:
        main = _load(PROJECT_SCRIPTS[program])
        parser = _load(PROJECT_SCRIPTS[program].replace(":main", ":build_parser"))()
        assert callable(main)
        parser.parse_args(args)  # SystemExit on an unknown subcommand or option
    elif program == "dask":
        (ep,) = [e for e in entry_points(group="dask_cli") if e.name == args[0]]
        _check_click(ep.load(), args[1:])
    else:
        _check_click(_load(_installed_script(program)), args)
        scripts = [a for a in args if a.endswith(".py")]
        assert all((ROOT / s).is_file() for s in scripts), scripts


def _env(service: dict) -> dict:
    env = service.get("environment") or {}
    return env if isinstance(env, dict) else dict(e.split("=", 1) for e in env)


def test_compose_has_the_scaled_deployment() -> None:
    assert {"api", "frontend", "scheduler", "worker", "postgres"} <= set(SERVICES)
    assert SERVICES["worker"]["deploy"]["replicas"] >= 2
    assert "ports" not in SERVICES["worker"]  # `--scale worker=N` needs no fixed host port
    assert SERVICES["postgres"]["image"].startswith("postgres")
    for name in ("api", "worker"):
        env = _env(SERVICES[name])
        settings = Settings(database_url=env["ATLAS_DATABASE_URL"],
                            dask_scheduler_address=env["ATLAS_DASK_SCHEDULER_ADDRESS"])
        host = re.search(r"@([\w-]+):", settings.db_url).group(1)
        assert host in SERVICES and SERVICES[host]["image"].startswith("postgres")
        scheduler = re.match(r"tcp://([\w-]+):(\d+)", settings.dask_scheduler_address)
        assert scheduler.group(1) == "scheduler"
        assert scheduler.group(2) in SERVICES["scheduler"]["command"]
        assert "atlas-data:/data" in SERVICES[name]["volumes"]  # workers read the API's files
        assert env["ATLAS_DATA_DIR"] == "/data"
    assert _env(SERVICES["worker"])["DASK_DISTRIBUTED__WORKER__DAEMON"] == "False"
    api_env = _env(SERVICES["api"])
    assert "0.0.0.0" in SERVICES["api"]["command"] and "ATLAS_API_TOKEN" in api_env
    assert _env(SERVICES["frontend"])["ATLAS_API_URL"] == "http://api:8000"
    assert set(COMPOSE["volumes"]) >= {"atlas-data", "postgres-data"}


@pytest.mark.parametrize("name", sorted(n for n, s in SERVICES.items() if "build" in s))
def test_every_service_command_is_a_real_entry_point(name: str) -> None:
    command = SERVICES[name]["command"]
    assert isinstance(command, list) and command
    _check_command(command)


def test_entry_point_check_rejects_bad_commands() -> None:
    for bad in (["relu-atlas", "serv"], ["relu-atlas", "serve", "--hots", "x"],
                ["dask", "worker", "tcp://s:1", "--no-such-flag"],
                ["streamlit", "run", "frontend/missing.py"]):
        with pytest.raises((SystemExit, click.UsageError, AssertionError)):
            _check_command(bad)


def test_dockerfile_copies_what_the_image_needs() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", text, re.M)
    copied = [src for line in re.findall(r"^COPY (.+)$", text, re.M)
              for src in line.split()[:-1]]
    assert {"pyproject.toml", "app", "backend", "frontend", "sample_models"} <= set(copied)
    assert all((ROOT / src).exists() for src in copied), copied
    assert "torch==2.13.0" in text and "pip install ." in text
    cmd = re.search(r"^CMD (\[.+\])$", text, re.M).group(1)
    _check_command(yaml.safe_load(cmd))
