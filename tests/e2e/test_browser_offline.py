"""In the browser: no page asks any host but the app's own for anything (the machines that
run ReLU Atlas may have no internet: fonts, icons and scripts must be served locally).

Oracle: every request chromium makes while each page loads and runs its defaults.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from frontend.catalog import PAGES

pytestmark = pytest.mark.browser


def test_every_page_loads_only_from_the_app(ui, atlas) -> None:
    outside: list[str] = []
    ui.page.on("request", lambda r: outside.append(r.url)
               if urlsplit(r.url).hostname not in ("127.0.0.1", "localhost", None)
               and not r.url.startswith(("data:", "blob:")) else None)
    for page in PAGES:
        ui.open_sample(page.url_path, "digits_fc_pgd", input="gallery:digits:0")
    ui.page.wait_for_timeout(1000)
    assert outside == [], sorted(set(outside))[:10]
