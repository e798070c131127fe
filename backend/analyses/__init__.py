"""Analysis plug-ins: every module in this package registers itself on import.

Importing this package imports all of its modules (so adding a file is all it takes) and the
extra modules named in ``ATLAS_EXTRA_ANALYSES`` (comma-separated module names).
"""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil

from backend.analyses.base import REGISTRY, Analysis, JobContext, jsonable, register


def load_all(extra: str | None = None) -> dict[str, Analysis]:
    """Import every plug-in module (idempotent) and return the registry."""
    names = [f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__) if m.name != "base"]
    extra = os.environ.get("ATLAS_EXTRA_ANALYSES", "") if extra is None else extra
    names += [m.strip() for m in extra.split(",") if m.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - one broken plug-in must not take the service down
            logging.getLogger(__name__).exception("analysis module %s failed to import", name)
    return REGISTRY


load_all()

__all__ = ["REGISTRY", "Analysis", "JobContext", "jsonable", "load_all", "register"]
