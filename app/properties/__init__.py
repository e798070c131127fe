"""Properties as VNN-COMP writes them: a VNN-LIB reader and a verifier answering proven,
counterexample (checked by a forward pass) or unknown."""

from app.properties.verify import Verdict, check_counterexample, verify
from app.properties.vnnlib import Case, VnnProperty, read_vnnlib

__all__ = ["Case", "Verdict", "VnnProperty", "check_counterexample", "read_vnnlib", "verify"]
