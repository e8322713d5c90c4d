"""What the smoke run is made of, in one place: it runs offline, in minutes on a CPU (the README has its timing).

  backbone.py  the tiny CLIP's sizes and seed, and its bundled pre-trained vision tower (assets/)
  pretrain.py  how that tower was made: dead-leaves images with the smoke distortions (`python -m` it to rebuild)
  data.py      the smoke dataset: scikit-image photos with blur / noise / JPEG at five known levels, as a CSV dataset

The generic pieces live where they belong: the tiny HF-format CLIP writer in mcpf_jax.clip.tiny, the CSV dataset
builder in mcpf_jax.data.
"""
