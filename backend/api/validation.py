"""Text from a request is checked before it reaches a query, a file name or the database.

PostgreSQL refuses NUL in text and fixed-length columns refuse long values; either would
surface as a 500. So ids, names and file names are refused up front, with a 422 that says
which field is wrong: control characters and invalid UTF-8 anywhere in the path or the query
string (by :class:`RejectUnsafeText`, for every route at once), and over-long or
control-character values in JSON fields (:data:`Id`) and form fields (:func:`clean_name`).
"""

from __future__ import annotations

import json
import re
from pathlib import PurePosixPath, PureWindowsPath
from typing import Annotated
from urllib.parse import unquote_to_bytes

from fastapi import HTTPException
from pydantic import StringConstraints
from starlette.types import ASGIApp, Receive, Scope, Send

CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_NAME = 200

Id = Annotated[str, StringConstraints(max_length=100, pattern=r"^[^\x00-\x1f\x7f]*$")]


def clean_name(value: str | None, default: str, what: str = "filename") -> str:
    """A file's base name (no folders), free of control characters and at most 200 long."""
    name = PureWindowsPath(PurePosixPath(value or "").name).name or default
    if CONTROL.search(name):
        raise HTTPException(422, f"{what} contains a control character")
    if len(name) > MAX_NAME:
        raise HTTPException(422, f"{what} is {len(name)} characters long (at most {MAX_NAME})")
    return name


def clean_json_text(text: str, what: str) -> str:
    """JSON text that holds no NUL character, raw or escaped."""
    if "\x00" in text or "\\u0000" in text:
        raise HTTPException(422, f"{what} contains a NUL character")
    return text


def _bad_text(raw: bytes) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "is not valid UTF-8"
    return "contains a control character" if CONTROL.search(text) else None


class RejectUnsafeText:
    """ASGI middleware: 422 for a path or query string with control characters or bytes
    that are not UTF-8, before any route (or the database) sees it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw_path = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
            problem = _bad_text(unquote_to_bytes(raw_path)) and "the URL path"
            query = scope.get("query_string", b"")
            for part in query.replace(b"+", b" ").split(b"&"):
                if not problem and _bad_text(unquote_to_bytes(part)):
                    problem = "a query parameter"
            if problem:
                reason = "has a control character or invalid UTF-8"
                body = json.dumps({"detail": f"{problem} {reason}"}).encode()
                await send({"type": "http.response.start", "status": 422,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
