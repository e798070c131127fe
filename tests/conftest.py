"""Shared fixtures: where the shared data lives, and skipping cleanly when it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SAMPLE_MODELS = ROOT / "sample_models"


def shared_path(*parts: str) -> Path:
    """Path under ``../shared/data``; skips the calling test when it is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


@pytest.fixture
def shared() -> Path:
    return shared_path()
