"""Models stored by content hash, uploaded inputs as .npy, gallery inputs from sample_models.

Files live under the data dir (``models/<sha256><suffix>``, ``inputs/<sha256>.npy``); their
records live in SQL. The API and the workers both use this class, so they agree on paths.

``owner`` arguments: a name restricts to what that API token's owner may see (its uploads and
the sample models); None (workers, start-up) sees everything.
"""

from __future__ import annotations

import hashlib
import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import ColumnElement, exists, select

from app import InvalidInputError, Network, UnsupportedModelError, load_network
from backend.db import InputRecord, ModelOwner, ModelRecord, owned_by, sessions_for, utcnow
from backend.sandbox import ModelChecker

log = logging.getLogger(__name__)
MODEL_SUFFIXES = {".onnx": "onnx", ".pt2": "torch.export"}


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
    def __init__(self, data_dir: Path, db_url: str, checker: ModelChecker | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.sessions = sessions_for(db_url)
        self.checker = checker  # parses uploads out of process; None: no uploads here

    # -- models ---------------------------------------------------------------------------

    def add_model(self, tmp: Path, name: str, source: str = "upload", card: dict | None = None,
                  input_shape: tuple[int, ...] | None = None, owner: str = "") -> ModelRecord:
        """Validate ``tmp`` and store it under its sha256, visible to ``owner`` (an upload,
        parsed in the sandbox process) or to everyone (``source="sample"``, our own files).

        ``tmp`` must carry the suffix of ``name``. An upload of bytes that already exist is
        granted to ``owner`` with ``owner``'s name and card. The file is kept only if its
        database row commits.

        Raises :class:`app.UnsupportedModelError` with the loader's message when it fails.
        """
        suffix = Path(name).suffix.lower()
        if suffix not in MODEL_SUFFIXES:
            raise UnsupportedModelError(
                f"unknown model format '{suffix or name}': upload .onnx or .pt2 (torch.export)")
        digest = sha256_file(tmp)
        display = (card or {}).get("name") or Path(name).stem
        existing = self.model(digest)
        if existing is not None:
            if existing.source == "sample":
                return existing
            self._grant(digest, owner, display, card or {})
            return self.model(digest, owner) or existing
        data, stored_suffix, shape, outputs, summary = self._parse(tmp, suffix, input_shape,
                                                                   trusted=source == "sample")
        filename = f"{digest}{stored_suffix}"
        path = self.data_dir / "models" / filename
        path.write_bytes(data)
        record = ModelRecord(
            id=digest, name=display, format=MODEL_SUFFIXES[suffix], filename=filename,
            input_shape=shape, num_outputs=outputs, card=card or {}, summary=summary,
            source=source, created_at=utcnow())
        try:
            with self.sessions() as s:
                s.merge(record)
                if source != "sample":
                    s.merge(ModelOwner(model_id=digest, owner=owner, name=display,
                                       card=card or {}))
                s.commit()
        except BaseException:
            if self.model(digest) is None:  # not committed by a concurrent upload either
                path.unlink(missing_ok=True)
            raise
        return record

    def _parse(self, tmp: Path, suffix: str, input_shape: tuple[int, ...] | None,
               trusted: bool) -> tuple[bytes, str, list[int], int, dict]:
        """``(bytes to store, their suffix, input shape, outputs, summary)``."""
        if trusted:
            try:
                net = load_network(tmp, input_shape)
            except InvalidInputError as exc:
                raise UnsupportedModelError(str(exc)) from exc
            return tmp.read_bytes(), suffix, list(net.input_shape), net.num_outputs, \
                net.summary()
        if self.checker is None:
            raise UnsupportedModelError("this process does not accept uploads")
        checked = self.checker.check(tmp.read_bytes(), suffix, input_shape)
        return (checked.data, checked.suffix, checked.input_shape, checked.num_outputs,
                checked.summary)

    def set_card(self, model_id: str, owner: str, card: dict) -> ModelRecord:
        """``owner``'s card for an upload (its name from ``card["name"]`` if given)."""
        with self.sessions() as s:
            access = s.get(ModelOwner, (model_id, owner))
            record = s.get(ModelRecord, model_id)
            if access is None or record is None:
                raise KeyError(model_id)
            access.name = card.get("name") or access.name or record.name
            access.card = card
            s.commit()
            return self._as_seen_by(record, access)

    def _grant(self, model_id: str, owner: str, name: str, card: dict) -> None:
        with self.sessions() as s:
            s.merge(ModelOwner(model_id=model_id, owner=owner, name=name, card=card))
            s.commit()

    @staticmethod
    def _visible(owner: str) -> ColumnElement[bool]:
        """Models ``owner`` may see: the samples and the ones it uploaded."""
        return (ModelRecord.source == "sample") | exists().where(
            ModelOwner.model_id == ModelRecord.id, ModelOwner.owner == owner)

    @staticmethod
    def _as_seen_by(record: ModelRecord, access: ModelOwner | None) -> ModelRecord:
        """The record with ``access``'s own name and card (a detached copy)."""
        if access is None or access.name is None:
            return record
        fields = {c.key: getattr(record, c.key) for c in ModelRecord.__table__.columns}
        return ModelRecord(**{**fields, "name": access.name, "card": access.card or {}})

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
        """The model (as ``owner`` sees it: its name and card), or None when unknown or not
        visible to ``owner``."""
        with self.sessions() as s:
            if owner is None:
                return s.get(ModelRecord, model_id)
            record = s.scalars(select(ModelRecord).where(ModelRecord.id == model_id,
                                                         self._visible(owner))).first()
            if record is None or record.source == "sample":
                return record
            return self._as_seen_by(record, s.get(ModelOwner, (model_id, owner)))

    def models(self, owner: str | None = None) -> list[ModelRecord]:
        q = select(ModelRecord).order_by(ModelRecord.source.desc(), ModelRecord.name)
        if owner is not None:
            q = q.where(self._visible(owner))
        with self.sessions() as s:
            records = list(s.scalars(q))
            if owner is None:
                return records
            access = {a.model_id: a for a in s.scalars(
                select(ModelOwner).where(ModelOwner.owner == owner))}
        return [self._as_seen_by(r, access.get(r.id)) for r in records]

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
        path = self.data_dir / "inputs" / filename
        np.save(path, x, allow_pickle=False)
        record = InputRecord(model_id=model_id, id=f"upload:{digest}", label=label[:200],
                             filename=filename, owner=owner, created_at=utcnow())
        try:
            with self.sessions() as s:
                s.merge(record)
                s.commit()
        except BaseException:
            with self.sessions() as s:
                kept = s.scalar(select(exists().where(InputRecord.filename == filename)))
            if not kept:
                path.unlink(missing_ok=True)
            raise
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
