"""Black-box weight recovery: reverse-engineer a ReLU network from queries alone.

``extract(oracle, input_dim, budget)`` only calls the oracle; :class:`QueryOracle` wraps an
engine network as a counting black box, and ``grade`` compares the result with the truth.
"""

from app.analyses.extraction.grading import (
    Grade,
    LayerGrade,
    dense_layers,
    first_layer_pairs,
    grade,
)
from app.analyses.extraction.oracle import QueryOracle
from app.analyses.extraction.recover import ExtractionResult, extract

__all__ = [
    "ExtractionResult",
    "Grade",
    "LayerGrade",
    "QueryOracle",
    "dense_layers",
    "extract",
    "first_layer_pairs",
    "grade",
]
