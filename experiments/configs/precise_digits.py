"""Precise (arXiv 2605.23522) on class-conditional digits: GRPO on log p(class | image) of a classifier.

Arg `preset[,sampler]`, sampler in flow_grpo | dance | cps | precise (default) | dance_precise:
  python -m experiments.main --config experiments/configs/precise_digits.py:cpu,cps --workdir runs/pd_cps
The base model is flow_images' digits run in runs/tables/digits_<preset> (trained first when missing);
the policy is a LoRA of its attention and MLP layers (Flow-GRPO: rank 32, alpha 64 on FLUX/SD3).
"""
from experiments.configs import _base, _precise, flow_images

VARIANTS = _precise.SAMPLERS     # the sampler, precise by default


def get_config(arg: str = "cpu"):
  preset, sampler = _base.parse_arg(arg, VARIANTS)
  c = _precise.grpo_config(preset, sampler, flow_images.get_config(preset), "digits")
  c.grpo.update({"reward": "digit_logprob", "group_size": 8, "eval_size": 200, "lora_rank": 8,
                 "lora_alpha": 16.0, "lora_patterns": ["block_\\d+/(attn|mlp)/"]})
  # smoke/cpu: a 3-step sliding SDE window (MixGRPO / Flow-GRPO-Fast) for every sampler: a full window costs
  # ~10 s per step on the 2 shared cores (load ~7) with groups of 8 x 4 conditions. 40 iterations per
  # run, because the table trains 4 samplers x 3 seeds.
  c.grpo.window_size = 3
  c.train.update({"num_steps": 40, "global_batch_size": 4, "eval_every": 8})
  if preset == "smoke":
    c.grpo.update({"group_size": 4, "eval_size": 16})
    c.train.update({"num_steps": 4, "global_batch_size": 8, "log_every": 2, "eval_every": 2,
                    "checkpoint_every": 2})
  elif preset == "paper":
    c.grpo.update({"group_size": 24, "lora_rank": 32, "lora_alpha": 64.0, "window_size": 0})
    c.train.update({"num_steps": 1000, "global_batch_size": 48, "eval_every": 50})
  return c
