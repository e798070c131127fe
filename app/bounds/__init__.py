"""Bound propagators over the engine's network representation."""
