"""Model definitions: the DiT backbone (one definition for every method)."""
from kindjax.archs import DIT_ARCHS
from kindjax.models.dit import DiT, abstract_params, build_model, init_params

__all__ = ["DiT", "DIT_ARCHS", "abstract_params", "build_model", "init_params"]
