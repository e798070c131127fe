"""Service settings, read from ``ATLAS_*`` environment variables (or a ``.env`` file).

The defaults are the embedded deployment: everything under ``.atlas_data`` on this machine,
SQLite, a local Dask cluster, bound to loopback.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.loaders.limits import LoadLimits

OWNER_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ATLAS_", env_file=".env", extra="ignore")

    data_dir: Path = Path(".atlas_data")
    database_url: str = Field("", description="SQLAlchemy URL; empty = SQLite in data_dir")
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_mb: float = Field(50, gt=0)
    dask_scheduler_address: str = Field("", description="empty = start a LocalCluster")
    dask_workers: int = Field(2, ge=1, description="LocalCluster worker processes")
    api_token: str = Field("", description="one token, for the default owner")
    api_tokens: str = Field("", description="comma-separated 'name:token' pairs (or bare "
                                            "tokens), each name one owner of uploads and jobs")
    job_time_limit_s: float = Field(3600, gt=0, description="default and maximum per job")
    job_memory_limit_mb: float = Field(4096, gt=0, description="default and maximum per job")
    upload_memory_mb: float = Field(2048, ge=256, description="address space of the process "
                                     "that parses uploaded models")
    upload_check_timeout_s: float = Field(120, gt=0, description="time to parse one upload")
    max_input_elements: int = Field(1 << 20, ge=1, description="largest model input (elements)")
    max_parameters: int = Field(50_000_000, ge=1, description="most parameters of a model")
    max_activation_elements: int = Field(1 << 24, ge=1, description="largest layer output")
    device: str = Field("cpu", description="where jobs run their networks: 'cpu', or 'cuda' / "
                                          "'cuda:N' when the worker has that GPU (else CPU)")
    register_samples: bool = True
    extra_analyses: str = Field("", description="comma-separated extra plug-in modules")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not DEVICE.match(value.strip().lower()):
            raise ValueError(f"ATLAS_DEVICE must be 'cpu', 'cuda' or 'cuda:N', not {value!r}")
        return value.strip().lower()

    @property
    def db_url(self) -> str:
        """The database URL actually used (SQLite file in the data dir by default)."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'atlas.db').resolve()}"

    def token_owners(self) -> dict[str, str]:
        """Token -> owner name: ``ATLAS_API_TOKEN`` is the default owner ``""``; a bare token
        in ``ATLAS_API_TOKENS`` is named after its hash. Empty: no token needed."""
        owners = {self.api_token: ""} if self.api_token else {}
        for k, entry in enumerate(e.strip() for e in self.api_tokens.split(",")):
            name, sep, token = entry.partition(":")
            if not sep:
                name, token = f"token-{hashlib.sha256(entry.encode()).hexdigest()[:8]}", entry
            if entry and (not token or not OWNER_NAME.match(name)):  # never echo a token
                raise ValueError(f"ATLAS_API_TOKENS entry {k + 1} is not 'name:token' (name: "
                                 "letters, digits, '_.-', at most 64) or a bare token")
            if entry:
                owners[token] = name
        return owners

    def load_limits(self) -> LoadLimits:
        return LoadLimits(self.max_input_elements, self.max_parameters,
                          self.max_activation_elements)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def prepare(self) -> Settings:
        """Create the data directories; returns self for chaining."""
        for sub in ("models", "inputs", "artifacts", "tmp"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        return self


def resolve_device(requested: str) -> tuple[torch.device, str | None]:
    """The device jobs run on for ``ATLAS_DEVICE=requested``, and why it differs (None: as
    asked). A CUDA device this worker does not have falls back to the CPU, with a note."""
    if not requested.startswith("cuda"):
        return torch.device("cpu"), None
    if not torch.cuda.is_available():
        return torch.device("cpu"), (f"ATLAS_DEVICE={requested} but this worker has no CUDA "
                                     "device (torch.cuda.is_available() is False): jobs run "
                                     "on the CPU")
    device = torch.device(requested)
    if device.index is not None and device.index >= torch.cuda.device_count():
        return torch.device("cpu"), (f"ATLAS_DEVICE={requested} but this worker has "
                                     f"{torch.cuda.device_count()} CUDA device(s): jobs run "
                                     "on the CPU")
    return device, None
