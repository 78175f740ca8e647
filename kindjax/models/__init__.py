"""Model definitions: the DiT backbone (one definition for every method)."""
from kindjax.models.dit import DiT, DIT_ARCHS, build_model

__all__ = ["DiT", "DIT_ARCHS", "build_model"]
