"""kindjax: decomposable diffusion transformers (KIND, FINE, DiT) in JAX/Flax."""
from kindjax.learngene import assemble, load_learngene, load_tailors
from kindjax.models.dit import build_model

__all__ = ["assemble", "build_model", "load_learngene", "load_tailors"]
