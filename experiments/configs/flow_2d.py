"""Rectified flow on 2-D toy data (`two_d`) with a residual MLP; Precise's double-ring model.

  python -m experiments.main --config experiments/configs/flow_2d.py:cpu --workdir runs/flow_2d
"""
from experiments.configs import _base


def get_config(preset: str = "cpu"):
  c = _base.base(preset)
  c.task = "flow_matching"
  c.data.update({"name": "two_d", "config": "double_ring", "field": "point", "label_field": "",
                 "eval_split": "eval"})
  c.model.update({"kind": "mlp", "width": 256, "depth": 4, "num_classes": 0})
  c.flow = {"time_kind": "uniform", "time_mean": 0.0, "time_std": 1.0, "shift": 1.0,
            "label_drop_prob": 0.0, "sample_steps": 50, "sample_shift": 1.0, "cfg_scale": 1.0,
            "num_samples": 2048, "eval_size": 4096}
  c.train.update({"num_steps": 4000, "global_batch_size": 512, "log_every": 200, "eval_every": 2000,
                  "checkpoint_every": 1000})
  c.optim.update({"lr": 2e-3, "warmup_steps": 100, "ema_decay": 0.999})
  if preset == "smoke":
    c.model.update({"width": 32, "depth": 2})
    c.flow.update({"sample_steps": 8, "num_samples": 256, "eval_size": 256})
    c.train.update({"num_steps": 12, "global_batch_size": 64, "log_every": 4, "eval_every": 6,
                    "sample_every": 6, "checkpoint_every": 6})
    c.optim.update({"warmup_steps": 2})
  elif preset == "paper":
    c.model.update({"width": 512, "depth": 6})
    c.train.update({"num_steps": 20000, "global_batch_size": 2048, "eval_every": 5000,
                    "checkpoint_every": 2000})
  return c
