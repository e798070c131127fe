"""A self-contained HTML report of a comparison, to share with people who have no Atlas.

plotly.js is embedded once (``include_plotlyjs=True`` on the first figure), so the file opens
offline; next to the figures it records what is needed to trust and redo them: the model
cards, the parameters, the inputs, the job of every cell, software versions and timestamps.
"""

from __future__ import annotations

import base64
import html
import json
import platform
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata

import plotly.graph_objects as go

CARD_FIELDS = ("training", "architecture", "dataset", "eps", "clean_accuracy", "pgd_accuracy",
               "certified_accuracy", "seed")
PACKAGES = ("relu-atlas", "plotly", "numpy", "streamlit", "httpx")
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } code { font-size: 0.85rem; } section.figure { margin: 1.5rem 0; }
a { word-break: break-all; }
"""


@dataclass
class ReportContent:
    """Everything a report shows; ``figures`` are ``(name, figure)`` in display order."""

    title: str
    models: list[dict]
    params: dict
    inputs: list[str]
    figures: list[tuple[str, go.Figure]]
    summary: list[dict] = field(default_factory=list)  # per model: the page's metric cards
    input_images: list[tuple[str, bytes]] = field(default_factory=list)  # (input id, PNG)
    jobs: list[dict] = field(default_factory=list)  # {model, input, analysis, job_id, status}
    link: str | None = None
    backend_version: str | None = None
    started_at: datetime | None = None
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))


def software_versions(backend_version: str | None = None) -> dict[str, str]:
    """Versions of Python, the platform and the packages that drew the report."""
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    if backend_version:
        versions["backend (relu-atlas service)"] = backend_version
    return versions


def build_report(content: ReportContent) -> str:
    """The report as one HTML document."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>{e(content.title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{e(content.title)}</h1>",
        f"<p>Created {e(content.created_at.isoformat(timespec='seconds'))}"
        + (f"; comparison started {e(content.started_at.isoformat(timespec='seconds'))}"
           if content.started_at else "") + ".</p>",
    ]
    if content.link:
        parts.append(f"<p>Reopen in ReLU Atlas: <a href='{e(content.link, quote=True)}'>"
                     f"{e(content.link)}</a></p>")
    parts += ["<h2>Models</h2>", _models_table(content.models),
              "<h2>Parameters</h2>", _table(["parameter", "value"], content.params.items()),
              f"<h2>Inputs ({len(content.inputs)})</h2>",
              "<p>" + ", ".join(f"<code>{e(i)}</code>" for i in content.inputs) + "</p>",
              *_images(content.input_images)]
    if content.summary:
        header = list(dict.fromkeys(k for row in content.summary for k in row))
        parts += ["<h2>Per model</h2>",
                  _table(header, ([row.get(k, "") for k in header] for row in content.summary))]
    parts += ["<h2>Figures</h2>"]
    for k, (name, fig) in enumerate(content.figures):
        div = fig.to_html(full_html=False, include_plotlyjs=k == 0, div_id=f"figure-{name}",
                          config={"displaylogo": False,
                                  "toImageButtonOptions": {"format": "png", "filename": name}})
        parts.append(f"<section class='figure' data-figure='{e(name, quote=True)}'>{div}"
                     "</section>")
    parts += ["<h2>Software</h2>",
              _table(["component", "version"], software_versions(content.backend_version).items())]
    if content.jobs:
        rows = [(j["model"], j["input"], j["analysis"], j["job_id"], j["status"])
                for j in content.jobs]
        parts += [f"<details><summary>Jobs behind every cell ({len(rows)})</summary>",
                  _table(["model", "input", "analysis", "job", "status"], rows), "</details>"]
    parts += ["<script type='application/json' id='atlas-report'>",
              json.dumps({"figures": [n for n, _ in content.figures], "params": content.params,
                          "inputs": content.inputs}).replace("</", "<\\/"),
              "</script></body></html>"]
    return "\n".join(parts)


def _images(images: list[tuple[str, bytes]]) -> list[str]:
    """Inline PNGs (the report is one file), each captioned with its input id."""
    e = html.escape
    return [f"<figure style='display:inline-block;margin:0 1rem 1rem 0'><img alt='{e(name)}' "
            f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
            f"<figcaption><code>{e(name)}</code></figcaption></figure>" for name, png in images]


def _models_table(models: list[dict]) -> str:
    rows = []
    for m in models:
        card = m.get("card") or {}
        rows.append([m["name"], m["id"][:12], *(card.get(f, "") for f in CARD_FIELDS)])
    return _table(["name", "id", *CARD_FIELDS], rows)


def _table(header: list[str], rows) -> str:  # noqa: ANN001 - any iterable of rows
    e = html.escape
    head = "".join(f"<th>{e(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
