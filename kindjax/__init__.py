"""kindjax: decomposable diffusion transformers (KIND, FINE, DiT) in JAX/Flax."""
from kindjax.models.dit import build_model

__all__ = ["build_model"]
