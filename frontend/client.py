"""HTTP client for the ReLU Atlas backend: the frontend's only way to reach models and jobs.

Every failure becomes an :class:`ApiError` whose message a user can act on (backend down,
bad upload, unknown job), so pages can show it as is.
"""

from __future__ import annotations

import os
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
ACTIVE = ("queued", "running")


class ApiError(Exception):
    """A request to the backend failed; ``status`` is the HTTP status (None if unreachable)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _detail(response: httpx.Response) -> str:
    """The backend's ``{"detail": ...}`` message, flattened for FastAPI validation errors."""
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        detail = response.text
    if isinstance(detail, list):
        detail = "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', [])[1:])}: {item.get('msg', item)}"
            if isinstance(item, dict) else str(item)
            for item in detail
        )
    return str(detail) or response.reason_phrase


class ApiClient:
    """Typed-by-contract wrapper over the ``/api`` routes of docs/ARCHITECTURE.md."""

    def __init__(
        self, base_url: str | None = None, token: str | None = None, timeout: float = 30.0
    ) -> None:
        self.base_url = (base_url or os.environ.get("ATLAS_API_URL") or DEFAULT_URL).rstrip("/")
        token = token if token is not None else os.environ.get("ATLAS_API_TOKEN", "")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, f"/api{path}", **kwargs)
        except httpx.TransportError as exc:
            raise ApiError(
                f"Cannot reach the ReLU Atlas backend at {self.base_url} ({exc.__class__.__name__})."
                " Is it running? Start everything with `make run`, or set ATLAS_API_URL."
            ) from exc
        if response.status_code >= 400:
            raise ApiError(
                f"{_detail(response)} (HTTP {response.status_code})", response.status_code
            )
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    # -- service ------------------------------------------------------------------------------

    def health(self) -> dict:
        return self._json("GET", "/health")

    def analyses(self) -> list[dict]:
        return self._json("GET", "/analyses")

    # -- models -------------------------------------------------------------------------------

    def models(self) -> list[dict]:
        return self._json("GET", "/models")

    def model(self, model_id: str) -> dict:
        return self._json("GET", f"/models/{model_id}")

    def upload_model(self, filename: str, data: bytes) -> dict:
        return self._json("POST", "/models", files={"file": (filename, data)})

    def set_card(self, model_id: str, card: dict) -> dict:
        return self._json("PUT", f"/models/{model_id}/card", json=card)

    def delete_model(self, model_id: str) -> None:
        self._request("DELETE", f"/models/{model_id}")

    # -- inputs -------------------------------------------------------------------------------

    def inputs(self, model_id: str) -> list[dict]:
        return self._json("GET", f"/models/{model_id}/inputs")

    def input(self, model_id: str, input_id: str) -> dict:
        return self._json("GET", f"/models/{model_id}/inputs/{input_id}")

    def upload_input(self, model_id: str, filename: str, data: bytes) -> dict:
        return self._json("POST", f"/models/{model_id}/inputs", files={"file": (filename, data)})

    def upload_dataset(self, model_id: str, filename: str, data: bytes) -> dict:
        """Many inputs in one file (.npz with x and optional y, .npy, .csv) for mining:
        ``{id, name, n, shape, has_labels}``."""
        return self._json("POST", f"/models/{model_id}/datasets",
                          files={"file": (filename, data)})

    def dataset(self, model_id: str, dataset_id: str) -> dict:
        return self._json("GET", f"/models/{model_id}/datasets/{dataset_id}")

    # -- jobs ---------------------------------------------------------------------------------

    def submit(
        self, analysis: str, model_id: str, input_id: str | None, params: dict | None = None
    ) -> dict:
        body = {"analysis": analysis, "model_id": model_id, "input_id": input_id,
                "params": params or {}}
        return self._json("POST", "/jobs", json=body)

    def jobs(self, limit: int | None = None) -> list[dict]:
        """Newest jobs first (the backend's default page size unless ``limit`` is given)."""
        return self._json("GET", "/jobs", params={"limit": limit} if limit else None)

    def submit_batch(self, analysis: str, model_ids: list[str], input_ids: list[str | None],
                     params: dict | None = None) -> dict:
        """One analysis fanned out over ``model_ids`` x ``input_ids`` (one child job each)."""
        body = {"analysis": analysis, "model_ids": model_ids, "input_ids": input_ids,
                "params": params or {}}
        return self._json("POST", "/batches", json=body)

    def batch(self, batch_id: str) -> dict:
        return self._json("GET", f"/batches/{batch_id}")

    def batch_result(self, batch_id: str) -> dict:
        return self._json("GET", f"/batches/{batch_id}/result")

    def cancel_batch(self, batch_id: str) -> dict:
        return self._json("POST", f"/batches/{batch_id}/cancel")

    def verify_rules(self, model_id: str, rules: list[dict], **settings: Any) -> dict:
        """Verify pattern rules in parallel as one batch (one ``patterns_verify`` job per rule);
        ``settings`` are the shared domain, eps, timeout and method."""
        return self._json("POST", "/patterns/verify",
                          json={"model_id": model_id, "rules": rules, **settings})

    def job(self, job_id: str) -> dict:
        return self._json("GET", f"/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict:
        return self._json("POST", f"/jobs/{job_id}/cancel")

    def result(self, job_id: str) -> dict:
        return self._json("GET", f"/jobs/{job_id}/result")

    def artifact(self, job_id: str, name: str) -> bytes:
        return self._request("GET", f"/jobs/{job_id}/artifacts/{name}").content
