"""tame_jax: TAME (Trainable Attention Mechanism for Explanations) in JAX/Flax."""

__version__ = "0.1.0"
