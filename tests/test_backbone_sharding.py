"""`mesh.shard_backbone` on each backbone family: the frozen backbone's kernels split over the "model" axis give the
replicated backbone's training and scores.

One subprocess of 4 CPU devices (tests/backbone_sharding_check.py, data=2 x model=2): a tiny CLIP and a tiny SigLIP
(MAP head, logit bias; written by transformers in the real format), train.py's jitted steps with and without the
option, the all-gathers of the sharded train step (each split weight gathered once: mesh.GatherOnce), and the rule's
share of a real SigLIP 2 So400m/14-384's bytes.
"""

import json
import pathlib
import subprocess
import sys

CHECK = pathlib.Path(__file__).with_name("backbone_sharding_check.py")


def test_sharded_backbone_trains_and_scores_as_the_replicated_one():
  done = subprocess.run([sys.executable, str(CHECK)], capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  out = json.loads(done.stdout.strip().splitlines()[-1])
  results = {r["family"]: r for r in out["results"]}
  assert sorted(results) == ["clip", "siglip"]
  for family, r in results.items():
    assert r["finite"], r
    assert r["split"] and not r["replicated_split"], r  # the option really splits leaves, and only it does
    assert all(name.startswith("clip/") for name in r["split"]), r  # the backbone's, never the prompts'
    assert r["loss_diff"] <= 1e-5 and r["grad_norm_diff"] <= 1e-5 and r["score_diff"] <= 1e-5, (family, r)
    # Each split weight gathered at most once per train step (mesh.GatherOnce), not at each use: at most one
    # all-gather per split leaf plus the few of the step's small outputs (text features, scores), and no more bytes
    # than the split weights (+ those outputs). Without it XLA gathered at each use: 40 / 73 all-gathers here.
    gathers = r["gathers"]
    assert gathers["count"] <= len(r["split"]) + 10, (family, gathers, len(r["split"]))
    assert gathers["bytes"] <= r["split_bytes"] + 16 * 1024, (family, gathers, r["split_bytes"])
  # SigLIP's own leaves are covered: the MAP head's attention and both towers' blocks.
  siglip = results["siglip"]["split"]
  assert "clip/vision_model/head/attention/in_proj_weight" in siglip, siglip
  assert any(n.startswith("clip/text_model/encoder/") for n in siglip), siglip
  # Full fine-tuning: Adam's two moments of each of the tiny CLIP's 18 split leaves split like it, nothing else.
  assert out["full_finetune"] == {"opt_leaves_split": 2 * len(results["clip"]["split"]), "opt_leaves_mismatched": 0}
  # At the real size the rule splits nearly all of the backbone's bytes (everything but norms, biases and the probe).
  assert out["so400m_share_split"] > 0.99, out["so400m_share_split"]
