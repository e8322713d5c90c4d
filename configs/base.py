"""The defaults of the method as the README describes it, and what each dataset changes (`DATASETS`).

`get_config()` gives the defaults (data.name "livec" at the default resize 512, as before: runs started from
configs/base.py keep resuming); `get_config("koniq10k")` the defaults with a dataset's fields, which is what
configs/koniq10k.py returns. From the command line the dataset is the config's argument (ml_collections'
`path:argument`), so one loop runs them all:
  for d in livec koniq10k spaq; do python train.py --config configs/base.py:$d --workdir runs/$d; done
A dataset is prepared first with `python -m mcpf_jax.data.prepare NAME --manual_dir <release folder> --data_dir
~/tensorflow_datasets`, or built on first use with data.manual_dir set.

Override anything on the command line: `python train.py --config configs/livec.py --config.optim.lr=5e-4`.
"""

import ml_collections
from ml_collections.config_dict import placeholder

# What each dataset's config sets over the defaults (fields of `data`). data.resize, the short side before cropping,
# keeps the crops at or near the images' native resolution.
DATASETS = {
    # LIVE In the Wild Challenge (CLIVE): 1162 authentic photos (500x500), MOS 0-100, split by image. 500: crops at
    # native resolution, no resampling.
    "livec": {"resize": 500},
    # KonIQ-10k: 10073 authentic photos (1024x768 -> 683x512; 384 would match the official 512x384 release), MOS
    # 0-100, split by image. data.split_protocol "seed" (the default) is the papers' 80/20 random splits by content
    # (--config.num_splits=10 for all ten); "official" is KonIQ's own 7058 / 1000 / 2015 training / validation /
    # test split (the `set` column of koniq10k_distributions_sets.csv), its validation set picking the best
    # checkpoint.
    "koniq10k": {"resize": 512, "split_protocol": "seed"},
    # SPAQ: 11125 smartphone photos of several megapixels, MOS 0-100, split by image, with scene labels. Resized to a
    # 512 short side (the usual practice); decoding them is the input pipeline's bottleneck (data.num_workers).
    "spaq": {"resize": 512},
    # LIVE IQA (release 2): 779 distorted images of 29 references (mostly 768x512), DMOS (lower is better), split by
    # reference image. 512: the short side of most LIVE images.
    "live": {"resize": 512},
    # CSIQ: 866 distorted images of 30 references (512x512), DMOS 0-1 (lower is better), split by reference.
    "csiq": {"resize": 512},
    # TID2013: 3000 distorted images of 25 references (512x384), MOS 0-9, split by reference. 384: no upscaling.
    "tid2013": {"resize": 384},
    # KADID-10k: 10125 distorted images of 81 references (512x384), MOS 1-5, split by reference. 384: no upscaling.
    "kadid10k": {"resize": 384},
    # AGIQA-3K: 2982 AI-generated images (512 px or larger, by generator), quality MOS, split by prompt so no prompt's
    # images are on both sides.
    "agiqa3k": {"resize": 512},
}


def get_config(dataset: str | None = None) -> ml_collections.ConfigDict:
  """The defaults; with `dataset` (a key of DATASETS, e.g. from `--config configs/base.py:spaq`), that dataset's."""
  if dataset is not None and dataset not in DATASETS:
    raise ValueError(f"configs/base.py: no dataset {dataset!r} (from the config argument, `base.py:{dataset}`); "
                     f"expected one of {', '.join(DATASETS)}")
  c = ml_collections.ConfigDict()
  c.seed = 0  # parameter init and data order; the split seed is data.split_seed
  # Modules imported before clip.name and data.name are looked up: each registers generated backbones and datasets
  # under names of its own (configs/smoke.py: "mcpf_jax.smoke", the tiny CLIP "tiny" and the data "smoke").
  c.plugins = ()

  c.clip = ml_collections.ConfigDict()
  c.clip.name = "openai/clip-vit-base-patch16"  # hub id, local HF folder, or preset (vit-b-32/-b-16/-l-14/-l-14-336)
  c.clip.revision = placeholder(str)  # hub branch/tag/commit; None = main
  c.clip.dtype = "float32"  # compute dtype: float32 | bfloat16 (bf16 inputs, float32-accumulating matmuls)
  c.clip.param_dtype = "float32"  # the frozen backbone's weights in memory: float32 | bfloat16 (half the memory)
  c.clip.remat = False  # rematerialise each transformer block in the backward pass (memory for compute)
  c.clip.scan_layers = False  # each tower's blocks as one lax.scan: one compiled block, same weights and numbers
  c.clip.image_chunk = placeholder(int)  # images per vision-tower pass (CLIP towers; speed only); None: 8 on CPU
  # (towers >= 256 wide), the whole batch on GPU/TPU; 0: the whole batch

  c.model = ml_collections.ConfigDict()
  c.model.name = "mcpf"  # mcpf | maple | coop | mpiqe | clipiqa
  c.model.prompt_depth = 9  # J: layers 0..J-1 get prompts (variants with a fixed depth ignore it)
  c.model.text_depth = placeholder(int)  # override the variant's text prompt depth
  c.model.vision_depth = placeholder(int)  # override the variant's visual prompt depth
  c.model.num_text_prompts = 8  # n learnable text prompts after SOS
  c.model.num_vision_prompts = 8  # n_v learnable visual prompts after the patches
  c.model.text_prompt_init = "a photo of a"  # layer-0 text prompts start from this phrase's embedding; "" = random
  c.model.fusion = placeholder(str)  # cross_attention | linear | none; None = the variant's
  c.model.fusion_width = 128  # shared width of the cross-attention fusion (keeps fusion ~3% of ViT-B/16)
  c.model.fusion_heads = 4
  c.model.shared_text_prompts = placeholder(bool)  # one text prompt set for all label sets; None = the variant's
  c.model.quality_classes = ("bad", "poor", "fair", "good", "perfect")  # worst to best
  c.model.quality_template = "{} quality."
  c.model.aux = ("scene", "distortion")  # auxiliary label sets (masked where a dataset has none)
  c.model.scene_template = "{}."
  c.model.distortion_template = "{} artifacts."
  c.model.query_heads = 8  # MP-IQE text-query cross-attention heads
  c.model.class_probs = "softmax"  # how class logits become the score's p: softmax over the classes, or "sigmoid"
  # (SigLIP's per-pair reading, normalised; its logit bias counts); see mcpf_jax/model/iqa.py
  c.model.pool_visual_prompts = False  # SigLIP only: the MAP head pools the visual prompts too (default: patches only)
  c.model.trainable = "prompts"  # prompts | all | none, or a tuple of regexes of trainable parameter paths

  c.loss = ml_collections.ConfigDict()
  c.loss.rank = 1.0  # pairwise fidelity ranking loss
  c.loss.l1 = 1.0  # L1 on MOS normalised to [0, 1]
  c.loss.cls = 0.5  # cross-entropy on the 5 MOS levels
  c.loss.aux = 0.1  # scene + distortion cross-entropies

  c.data = ml_collections.ConfigDict()
  c.data.name = "livec"  # a dataset of mcpf_jax.data (prepared with `python -m mcpf_jax.data.prepare`)
  c.data.data_dir = "~/tensorflow_datasets"  # where prepared datasets live ("" = <workdir>/data)
  c.data.manual_dir = placeholder(str)  # the official extracted folder; set to prepare on first use
  c.data.split_protocol = "seed"  # "seed": a seeded 80/20 split by content; "official": the dataset's own split
  c.data.split_seed = 0  # seeds 0..9 are the protocol's ten splits
  c.data.train_fraction = 0.8
  c.data.val_fraction = 0.1  # of the training contents, held out to pick the best checkpoint (0 = none)
  c.data.resize = 512  # short side before cropping
  c.data.image_size = placeholder(int)  # crop size; None = the CLIP's input size (224, or 336 for L/14-336)
  c.data.prefetch_to_device = 2  # training batches transferred to the devices ahead of the step (0 = none)
  c.data.num_workers = -1  # decoding worker processes (0 = in the main process, with threads); -1 = from the host's
  # cores C: 0 below 4 cores, else min(C - 1, 32) (mcpf_jax/data/pipeline.py input_sizes; README "Input")

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 32  # global batch, split over the mesh's data axis (rounded up to a multiple of data x
  # accumulate_steps where that does not divide it, with a log line: a pod needs no per-topology value)
  c.train.num_epochs = 30
  c.train.accumulate_steps = 1  # gradient accumulation micro-batches per step
  c.train.log_every = 10  # steps between log lines / TensorBoard scalars
  c.train.checkpoint_every = 200  # steps between checkpoints (and one at the end)
  c.train.checkpoint_minutes = 30.0  # also save when this long passed since the last save (bounds what a hard kill
  # loses; such saves are not validated and never become the best checkpoint). 0 = off
  c.train.keep = 3  # most recent checkpoints kept (the best one is always kept too)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 100
  c.optim.total_steps = placeholder(int)  # None = num_epochs * steps per epoch
  c.optim.final_lr_fraction = 0.0
  c.optim.weight_decay = 1e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.grad_clip_norm = 1.0  # 0 = off

  c.eval = ml_collections.ConfigDict()
  c.eval.num_crops = 15  # evenly spaced crops averaged per image
  c.eval.batch_size = 16  # images per eval batch (x num_crops crops); rounded up to a multiple of the mesh's data
  # axis like train.batch_size; the last batch is padded with rows that are never scored
  c.eval.dataset = placeholder(str)  # evaluate on another dataset (cross-dataset); None = data.name
  c.eval.checkpoint = "best"  # best | latest | a step number

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # devices along the batch axis (-1 = the rest)
  c.mesh.model = 1  # devices the frozen backbone is sharded over (FSDP-style rules below)
  c.mesh.shard_backbone = False  # shard large backbone kernels over 'model' (for L/14 on small-memory chips)

  c.checkpoint_dir = ""  # where checkpoints go ("" = <workdir>/checkpoints); another folder or gs://bucket/path
  c.init_from = placeholder(str)  # another run's workdir: step 0 starts from its trained prompts/fusion (fine-tuning)
  c.init_from_checkpoint = "best"  # which checkpoint of init_from: best | latest | a step
  c.num_splits = 1  # >1 runs the protocol: splits 0..N-1, each trained and evaluated, median reported

  if dataset is not None:
    c.data.name = dataset
    c.data.update(DATASETS[dataset])
  return c
