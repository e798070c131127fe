"""Exact linear regions along lines and planes, and exact Integrated Gradients.

``exact_line`` (ExactLine, Sotoudeh & Thakur) splits a segment in input space into the pieces
on which the network is affine; ``exact_plane`` does the same for a triangle or parallelogram;
``exact_integrated_gradients`` sums the constant gradient of each piece, so it needs no steps.
"""

from app.analyses.linear_regions.line import ExactLine, exact_line, exact_lines

__all__ = ["ExactLine", "exact_line", "exact_lines"]
