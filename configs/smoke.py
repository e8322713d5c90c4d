"""The smoke run: a tiny CLIP (real HF format) on the built-in smoke data, offline, in minutes on a CPU (README).

Data: 12 scikit-image photos x (pristine + blur/noise/JPEG at 5 levels), MOS = 5 - 0.8 * level, split by photo.
`python train.py --config configs/smoke.py --workdir runs/smoke && python eval.py --config configs/smoke.py
--workdir runs/smoke`.
"""

from configs import base
from mcpf_jax.smoke import backbone


def get_config():
  c = base.get_config()
  c.plugins = ("mcpf_jax.smoke",)  # registers the backbone "tiny" and the dataset "smoke" used below
  c.clip.name = "tiny"  # a tiny CLIP written into <workdir>/tiny_clip in the Hugging Face format
  c.clip.tiny_seed = backbone.SEED
  # Random text tower; the vision tower is the bundled one pre-trained on procedural dead-leaves images (never on
  # a smoke photo): a random tower carries too little quality information for any prompt to rank unseen photos
  # (BENCHMARKS.md, "The smoke run's tiny CLIP", has the numbers). A softer temperature than CLIP's 100 suits the
  # tiny model.
  c.clip.tiny = dict(**backbone.SIZES, logit_scale=10.0, vision_weights="smoke")

  c.model.update(prompt_depth=3, num_text_prompts=4, num_vision_prompts=4, fusion_width=32, fusion_heads=2,
                 query_heads=2)

  c.data.name = "smoke"
  c.data.data_dir = ""  # built inside the workdir: the run is self-contained
  c.data.resize = 256  # the smoke photos' own short side: distortions seen at native resolution
  c.data.num_workers = 0  # 2 cores: decoding in the main process is fastest (benchmarks/decode_throughput.py)

  # Ranking + L1, no level cross-entropy (it added nothing on the default split: BENCHMARKS.md, "The smoke run's
  # tiny CLIP"); no auxiliary labels in the smoke data.
  c.loss.update(l1=1.0, cls=0.0, aux=0.0)

  c.train.update(batch_size=32, num_epochs=60, log_every=10, checkpoint_every=80, keep=2)
  c.optim.update(lr=3e-3, warmup_steps=20)

  c.eval.num_crops = 9  # a 3 x 3 grid of 64-px crops: the tiny model sees a small part of a 256-px photo per crop
  c.eval.batch_size = 16
  return c
