"""Precise (arXiv 2605.23522) on the 2-D double ring: GRPO toward the outer ring with an SDE sampler.

Arg `preset[,sampler]`, sampler in flow_grpo | dance | cps | precise (default) | dance_precise:
  python -m experiments.main --config experiments/configs/precise_2d.py:cpu,flow_grpo --workdir runs/p2d_fg
The base model is flow_2d's run in runs/tables/flow_2d_<preset> (trained first when missing).
"""
from experiments.configs import _base, _precise, flow_2d

VARIANTS = _precise.SAMPLERS     # the sampler, precise by default


def get_config(arg: str = "cpu"):
  preset, sampler = _base.parse_arg(arg, VARIANTS)
  c = _precise.grpo_config(preset, sampler, flow_2d.get_config(preset), "flow_2d")
  c.grpo.update({"reward": "outer_ring", "group_size": 16, "eval_size": 1024,
                 "lora_patterns": ["block_\\d+/fc"]})
  # Full fine-tuning of the MLP; lr 1e-4 spreads the rise over ~60 iterations (3e-4 saturates the
  # reward in ~30), so iterations-to-target separate the samplers. cpu: 0.4-0.8 s per step measured on
  # the 2 shared cores (load ~7), about a minute per run with start-up.
  c.optim.lr = 1e-4
  c.train.update({"num_steps": 80, "global_batch_size": 8, "eval_every": 10})
  if preset == "smoke":
    c.grpo.update({"group_size": 4, "eval_size": 64})
    c.train.update({"num_steps": 4, "global_batch_size": 8, "log_every": 2, "eval_every": 2,
                    "checkpoint_every": 2})
  elif preset == "paper":   # Flow-GRPO / Precise: groups of 24, 48 groups per step
    c.grpo.update({"group_size": 24})
    c.train.update({"num_steps": 1000, "global_batch_size": 48, "eval_every": 50})
  return c
