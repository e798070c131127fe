"""Models stored by content hash, uploaded inputs as .npy, gallery inputs from sample_models.

Files live under the data dir (``models/<sha256><suffix>``, ``inputs/<sha256>.npy``); their
records live in SQL. The API and the workers both use this class, so they agree on paths.

``owner`` arguments: a name restricts to what that API token's owner may see (its uploads and
the sample models); None (workers, start-up) sees everything.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import ColumnElement, exists, select

from app import InvalidInputError, Network, UnsupportedModelError, load_network
from backend.db import InputRecord, ModelOwner, ModelRecord, owned_by, sessions_for, utcnow

log = logging.getLogger(__name__)
MODEL_SUFFIXES = {".onnx": "onnx", ".pt2": "torch.export", ".pt": "torchscript",
                  ".pth": "torchscript", ".ts": "torchscript"}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@lru_cache(maxsize=16)
def _load_cached(path: str, input_shape: tuple[int, ...] | None) -> Network:
    return load_network(path, input_shape).eval()


@lru_cache(maxsize=8)
def _gallery(dataset: str) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        from sample_models import load_gallery
    except ImportError:
        return None
    try:
        x, y = load_gallery(dataset)
    except (FileNotFoundError, KeyError, ValueError, OSError):
        return None
    return np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)


class Storage:
    def __init__(self, data_dir: Path, db_url: str) -> None:
        self.data_dir = Path(data_dir)
        self.sessions = sessions_for(db_url)

    # -- models ---------------------------------------------------------------------------

    def add_model(self, tmp: Path, name: str, source: str = "upload", card: dict | None = None,
                  input_shape: tuple[int, ...] | None = None, owner: str = "") -> ModelRecord:
        """Validate ``tmp`` with the engine's loader and store it under its sha256, visible to
        ``owner`` (an upload) or to everyone (``source="sample"``).

        ``tmp`` must carry the suffix of ``name`` (the loaders dispatch on it).

        Raises :class:`app.UnsupportedModelError` with the loader's message when it fails.
        """
        suffix = Path(name).suffix.lower()
        if suffix not in MODEL_SUFFIXES:
            raise UnsupportedModelError(
                f"unknown model format '{suffix or name}': upload .onnx, .pt2 (torch.export) "
                "or a TorchScript file (.pt, .pth, .ts)")
        digest = sha256_file(tmp)
        existing = self.model(digest)
        if existing is not None:
            if existing.source != "sample":
                self._grant(digest, owner)
            return existing
        try:
            net = load_network(tmp, input_shape)
        except InvalidInputError as exc:
            raise UnsupportedModelError(str(exc)) from exc
        filename = f"{digest}{suffix}"
        shutil.copyfile(tmp, self.data_dir / "models" / filename)
        record = ModelRecord(
            id=digest, name=(card or {}).get("name") or Path(name).stem,
            format=MODEL_SUFFIXES[suffix], filename=filename,
            input_shape=list(net.input_shape), num_outputs=net.num_outputs, card=card or {},
            summary=net.summary(), source=source, created_at=utcnow())
        with self.sessions() as s:
            s.merge(record)
            if source != "sample":
                s.merge(ModelOwner(model_id=digest, owner=owner))
            s.commit()
        return record

    def _grant(self, model_id: str, owner: str) -> None:
        with self.sessions() as s:
            s.merge(ModelOwner(model_id=model_id, owner=owner))
            s.commit()

    @staticmethod
    def _visible(owner: str) -> ColumnElement[bool]:
        """Models ``owner`` may see: the samples and the ones it uploaded."""
        return (ModelRecord.source == "sample") | exists().where(
            ModelOwner.model_id == ModelRecord.id, ModelOwner.owner == owner)

    def register_samples(self) -> int:
        """Register the packaged sample models (if the package and its files exist)."""
        try:
            from sample_models import list_sample_models
            samples = list(list_sample_models())
        except Exception:  # noqa: BLE001 - a missing/half-written package must not stop start-up
            log.warning("sample models unavailable", exc_info=True)
            return 0
        count = 0
        for path, card in samples:
            path = Path(path)
            try:
                self.add_model(path, path.name, source="sample", card=dict(card))
                count += 1
            except (UnsupportedModelError, OSError) as exc:
                log.warning("sample model %s not registered: %s", path, exc)
        return count

    def model(self, model_id: str, owner: str | None = None) -> ModelRecord | None:
        with self.sessions() as s:
            if owner is None:
                return s.get(ModelRecord, model_id)
            return s.scalars(select(ModelRecord).where(ModelRecord.id == model_id,
                                                       self._visible(owner))).first()

    def models(self, owner: str | None = None) -> list[ModelRecord]:
        q = select(ModelRecord).order_by(ModelRecord.source.desc(), ModelRecord.name)
        if owner is not None:
            q = q.where(self._visible(owner))
        with self.sessions() as s:
            return list(s.scalars(q))

    def delete_model(self, model_id: str, owner: str = "") -> bool:
        """Withdraw ``owner``'s upload (and its inputs); the file and record go with the last
        owner. Sample models are shared and stay."""
        with self.sessions() as s:
            record = s.get(ModelRecord, model_id)
            if record is None or record.source == "sample":
                return False
            access = s.get(ModelOwner, (model_id, owner))
            if access is None:
                return False
            s.delete(access)
            for inp in s.scalars(select(InputRecord).where(InputRecord.model_id == model_id,
                                                           owned_by(InputRecord.owner, owner))):
                s.delete(inp)
            s.flush()
            last = not s.scalar(select(exists().where(ModelOwner.model_id == model_id)))
            if last:
                s.delete(record)
            s.commit()
        if last:
            (self.data_dir / "models" / record.filename).unlink(missing_ok=True)
        return True

    def network(self, record: ModelRecord) -> Network:
        """The model's network (cached per process: workers run many jobs on one model)."""
        path = self.data_dir / "models" / record.filename
        return _load_cached(str(path), tuple(record.input_shape))

    # -- inputs ---------------------------------------------------------------------------

    def add_input(self, model_id: str, x: np.ndarray, label: str,
                  owner: str = "") -> InputRecord:
        """Store ``x`` under a content hash; a named owner's hash includes its name, so two
        owners uploading the same array get different ids (ids are per owner)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        salt = f"{owner}\0".encode() if owner else b""
        digest = hashlib.sha256(salt + repr(x.shape).encode() + x.tobytes()).hexdigest()
        filename = f"{digest}.npy"
        np.save(self.data_dir / "inputs" / filename, x, allow_pickle=False)
        record = InputRecord(model_id=model_id, id=f"upload:{digest}", label=label[:200],
                             filename=filename, owner=owner, created_at=utcnow())
        with self.sessions() as s:
            s.merge(record)
            s.commit()
        return record

    def inputs(self, model: ModelRecord, owner: str = "") -> list[dict]:
        """Gallery inputs of the model's dataset, then ``owner``'s uploads for the model."""
        out = []
        dataset = model.card.get("dataset")
        gallery = _gallery(dataset) if dataset else None
        if gallery is not None and tuple(gallery[0].shape[1:]) == tuple(model.input_shape):
            classes = model.card.get("classes") or []
            for i, y in enumerate(gallery[1].tolist()):
                name = classes[y] if y < len(classes) else y
                out.append({"id": f"gallery:{dataset}:{i}", "label": f"#{i}: {name}",
                            "source": "gallery", "target": int(y)})
        with self.sessions() as s:
            for r in s.scalars(select(InputRecord).where(InputRecord.model_id == model.id,
                                                         owned_by(InputRecord.owner, owner))
                               .order_by(InputRecord.created_at)):
                out.append({"id": r.id, "label": r.label, "source": "upload", "target": None})
        return out

    def load_input(self, model: ModelRecord, input_id: str, owner: str | None = None,
                   ) -> tuple[np.ndarray, int | None, str]:
        """``(x, true label or None, display label)``; KeyError when unknown for the model
        (or not ``owner``'s upload)."""
        kind, _, rest = input_id.partition(":")
        if kind == "gallery":
            dataset, _, index = rest.rpartition(":")
            gallery = _gallery(dataset) if dataset == model.card.get("dataset") else None
            if gallery is None or not index.isdigit() or int(index) >= len(gallery[0]):
                raise KeyError(input_id)
            i = int(index)
            if tuple(gallery[0].shape[1:]) != tuple(model.input_shape):
                raise KeyError(input_id)
            return gallery[0][i], int(gallery[1][i]), f"#{i}"
        with self.sessions() as s:
            record = s.get(InputRecord, (model.id, input_id))
        if record is None or owner is not None and (record.owner or "") != owner:
            raise KeyError(input_id)
        x = np.load(self.data_dir / "inputs" / record.filename, allow_pickle=False)
        return x, None, record.label

    def gallery(self, model: ModelRecord, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        dataset = model.card.get("dataset")
        gallery = _gallery(dataset) if dataset else None
        if gallery is None or tuple(gallery[0].shape[1:]) != tuple(model.input_shape):
            return torch.zeros((0, *model.input_shape)), torch.zeros(0, dtype=torch.long)
        x, y = gallery
        return torch.from_numpy(x[:n].copy()), torch.from_numpy(y[:n].copy())
