"""ReLU Atlas analysis engine: one network representation, many analyses.

``load_network(path_or_module)`` returns a :class:`Network`, callable on a batch like a torch
module. Analyses live in :mod:`app.analyses`, bound propagators in :mod:`app.bounds`.
"""

from app.errors import AtlasError, Cancelled, InvalidInputError, UnsupportedModelError
from app.loaders import load_network
from app.network import Network

__all__ = [
    "AtlasError",
    "Cancelled",
    "InvalidInputError",
    "Network",
    "UnsupportedModelError",
    "load_network",
]
