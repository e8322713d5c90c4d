"""Training on a ("data", "model") mesh of one or many hosts: build.py builds a run from its config, trainer.py runs
the loop (resumable, preemptible), evaluation.py scores a part of the split and serves eval.py. The inference side
(scoring/, runs.py, export.py) never imports this package."""
