"""Precise (arXiv 2605.23522) on class-conditional digits: GRPO on log p(class | image) of a classifier.

Arg `preset[,variant]`: the variant is the sampler under the matched recipe (flow_grpo | dance | cps |
precise (default) | dance_precise) or `<sampler>_published` for its own paper's recipe
(experiments/configs/_precise.py):
  python -m experiments.main --config experiments/configs/precise_digits.py:cpu,cps --workdir runs/pd_cps
The base model is flow_images' digits run in runs/tables/digits_<preset> (trained first when missing);
the policy is a LoRA of its attention and MLP layers (Flow-GRPO: rank 32, alpha 64 on FLUX/SD3).
"""
from experiments.configs import _base, _precise, flow_images

VARIANTS = _precise.VARIANTS


def get_config(arg: str = "cpu"):
  preset, variant = _base.parse_arg(arg, VARIANTS)
  c = _precise.grpo_config(preset, variant, flow_images.get_config(preset), "digits")
  # Shift 3 (SD3's and DanceGRPO's sampling shift) for images.
  c.grpo.update({"reward": "digit_logprob", "group_size": 8, "eval_size": 200, "lora_rank": 8,
                 "lora_alpha": 16.0, "lora_patterns": ["block_\\d+/(attn|mlp)/"], "shift": 3.0})
  # smoke/cpu: every sampler trains a 3-step sliding SDE window (MixGRPO / Flow-GRPO-Fast), the same
  # window for all: the full 9 steps cost ~3x the time per iteration on the 2 cores.
  c.grpo.window_size = 3
  # 80 iterations: measured at seed 0, Precise's 10-NFE ODE reward still rises steadily at 60
  # (-0.96 at 10, -0.54 at 60) and Dance's has barely moved; reaching the plateau would take several
  # times the table's budget, so the digits race is read before convergence.
  c.train.update({"num_steps": 80, "global_batch_size": 4, "eval_every": 10})
  if preset == "smoke":
    c.grpo.update({"group_size": 4, "eval_size": 16, "eval_long_nfe": 12})
    c.train.update({"num_steps": 4, "global_batch_size": 8, "log_every": 2, "eval_every": 2,
                    "checkpoint_every": 2})
  elif preset == "paper":
    c.grpo.update({"group_size": 24, "lora_rank": 32, "lora_alpha": 64.0, "window_size": 0})
    c.train.update({"num_steps": 1000, "global_batch_size": 48, "eval_every": 50})
  return c
