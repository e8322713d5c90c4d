"""The class-prompt rows spread over the data axis (IQAModel.text_sharding) give the replicated text tower's numbers.

One subprocess of 4 CPU devices (tests/text_sharding_check.py): MCPF (shared prompts, 25 rows over 4 devices:
3 padding rows) and MP-IQE (a prompt set per label set, per-row prompts, over 2), forward scores and prompt
gradients of the numpy-reference tiny model, and the per-device FLOPs of each compiled program.
"""

import json
import pathlib
import subprocess
import sys

CHECK = pathlib.Path(__file__).with_name("text_sharding_check.py")


def test_sharded_class_prompts_give_the_same_scores_and_gradients_for_less_work():
  done = subprocess.run([sys.executable, str(CHECK)], capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads(done.stdout.strip().splitlines()[-1])
  assert [(r["variant"], r["data"]) for r in results] == [("mcpf", 4), ("mpiqe", 2)]
  for r in results:
    assert r["score_diff"] <= 1e-5 and r["grad_diff"] <= 1e-5, r
    # Each device encodes a quarter (a half) of the rows: the program does less per device than the replicated one.
    assert r["flops"] < 0.9 * r["replicated_flops"], r
