"""Exact linear regions along lines and planes, and exact Integrated Gradients.

``exact_line`` (ExactLine, Sotoudeh & Thakur) splits a segment in input space into the pieces
on which the network is affine; ``exact_plane`` does the same for a triangle or parallelogram;
``exact_integrated_gradients`` sums the constant gradient of each piece, so it needs no steps.
"""

from app.analyses.linear_regions.directions import DIRECTIONS, direction, endpoint
from app.analyses.linear_regions.ig import (
    ExactIG,
    IGComparison,
    captum_integrated_gradients,
    compare_with_captum,
    exact_integrated_gradients,
    relative_error,
)
from app.analyses.linear_regions.line import ExactLine, exact_line, exact_lines
from app.analyses.linear_regions.linearity import LinearityStudy, linearity_study
from app.analyses.linear_regions.plane import ExactPlane, exact_plane

__all__ = [
    "DIRECTIONS",
    "ExactIG",
    "ExactLine",
    "ExactPlane",
    "IGComparison",
    "LinearityStudy",
    "captum_integrated_gradients",
    "compare_with_captum",
    "direction",
    "endpoint",
    "exact_integrated_gradients",
    "exact_line",
    "exact_lines",
    "exact_plane",
    "linearity_study",
    "relative_error",
]
