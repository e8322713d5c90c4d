"""mcpf_jax: CLIP multi-modal prompt learning for no-reference image quality assessment in JAX/Flax.

Subpackages, top to bottom (each imports only those below it; `make lint` checks it): train/ and scoring/; model/,
data/, runs.py, pretrained.py, metrics.py; smoke/; clip/; images.py, scores.py, classes.py. The README's Layout
section says what each file does.
"""

__version__ = "0.1.0"
