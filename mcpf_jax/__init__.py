"""mcpf_jax: CLIP multi-modal prompt learning for no-reference image quality assessment in JAX/Flax."""

__version__ = "0.1.0"
