"""The app's pages in menu order, shared by the navigation and the Jobs page's links.

``analyses`` are the backend analyses a page runs (empty for pages that run none), so a job can
link back to the page that shows its result.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PageInfo:
    file: str
    title: str
    icon: str
    url_path: str
    analyses: tuple[str, ...]


PAGES = (
    PageInfo("pages/1_predict.py", "Predict", ":material/insights:", "predict", ("predict",)),
    PageInfo("pages/2_linear_regions.py", "Linear regions", ":material/grid_on:",
             "linear_regions",
             ("linear_regions_line", "linear_regions_plane", "linear_regions_ig")),
    PageInfo("pages/3_saliency.py", "SMT saliency", ":material/flare:", "saliency", ("saliency",)),
    PageInfo("pages/4_proof_features.py", "Proof features", ":material/verified:",
             "proof_features", ("proof_features", "proof_eps", "proof_compare")),
    PageInfo("pages/5_patterns.py", "Pattern rules", ":material/rule:", "patterns", ("patterns",)),
    PageInfo("pages/6_extraction.py", "Weight recovery", ":material/key:", "extraction",
             ("extraction",)),
    PageInfo("pages/7_compare.py", "Compare", ":material/compare:", "compare", ("compare",)),
    PageInfo("pages/8_jobs.py", "Jobs", ":material/list_alt:", "jobs", ()),
)


def page_for(analysis: str) -> PageInfo | None:
    """The page that shows results of ``analysis``, if any."""
    return next((p for p in PAGES if analysis in p.analyses), None)
