"""Fields every experiment config shares; each `experiments/configs/<exp>.py` starts from `base()`.

Presets: `smoke` (seconds: tests and notebooks), `cpu` (the CPU-scale reproduction, minutes), `paper`
(the paper's architecture and hyper-parameters, for GPUs).

A config module may declare `VARIANTS` (the first is the default): its argument is then
`preset[,variant]`, e.g. `cpu,image_crops`; `parse_arg` checks both parts.
"""
import ml_collections

from core import sharding

PRESETS = ("smoke", "cpu", "paper")


def check_preset(preset: str) -> str:
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
  return preset


def parse_arg(arg: str, variants: tuple[str, ...] = ()) -> tuple[str, str]:
  """'preset[,variant]' -> (preset, variant): variant is variants[0] when omitted, '' with none."""
  preset, comma, variant = arg.partition(",")
  check_preset(preset)
  if not variants:
    if comma:
      raise ValueError(f"{arg!r}: this config has no variants; valid presets: {', '.join(PRESETS)}")
    return preset, ""
  variant = variant or variants[0]
  if variant not in variants:
    raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(variants)} "
                     f"(default {variants[0]})")
  return preset, variant


def config_args(variants: tuple[str, ...] = ()) -> list[str]:
  """Every argument a config with these variants accepts, the default variant left implicit."""
  return [p if i == 0 else f"{p},{v}" for i, v in enumerate(variants or ("",)) for p in PRESETS]


def base(preset: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = check_preset(preset)
  c.task = ""                  # name registered in core.registry
  c.seed = 0
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})   # -1: remaining devices
  # Logical axis names (declared by the layers, core/nn/partitioning.py) -> mesh axes; arrays below
  # min_fsdp_size elements replicate.
  c.sharding = ml_collections.ConfigDict({"min_fsdp_size": 2**14,
                                          "logical_axis_rules": sharding.DEFAULT_LOGICAL_AXIS_RULES})
  c.train = ml_collections.ConfigDict({
      "num_steps": 1000,
      "global_batch_size": 64,
      "compute_dtype": "float32",   # float32 master params; "bfloat16" casts them for the forward pass
      "log_every": 50,
      "eval_every": 0,              # 0: only at the end
      "sample_every": 0,
      "checkpoint_every": 500,
      "keep_checkpoints": 3,
  })
  c.optim = ml_collections.ConfigDict({
      "name": "adamw", "lr": 1e-3, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
      "schedule": "cosine", "warmup_steps": 0, "min_lr_ratio": 0.0,
      "grad_clip_norm": 1.0,        # 0 disables clipping
      "ema_decay": 0.0,             # 0 disables EMA (ema_params then equal params)
      # True: the decay at update n (0, 1, ...) is min(ema_decay, (1 + n) / (10 + n)), so the EMA
      # forgets the initial weights early (a constant 0.9999 still holds 37% of them at 10k steps).
      "ema_warmup": False,
  })
  c.data = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict()
  return c
