"""The GRPO fields shared by `precise_2d` and `precise_digits` (task "flow_grpo", flowrl/task.py).

Each sampler keeps the published recipe it comes with (its noise level, PPO clip range and KL weight;
`sde_last_step`: the step to t = 0 sampled with the SDE, untrained, as the Flow-GRPO and Precise
pipelines do, which leaves Flow-GRPO's and Dance's samples noisy; CPS's and Precise's step there is
deterministic. DanceGRPO's own pipeline decodes the last step's x0 estimate instead):
  flow_grpo  Flow-GRPO (arXiv 2505.05470): a = 0.7, clip 1e-4, beta 0.04, trains 99% of the steps.
  dance      DanceGRPO (arXiv 2505.07818): eta = 0.3, clip 1e-4, beta 0, same noise per group,
             trains 60% of the steps.
  cps        FlowCPS (arXiv 2509.05952, on the Flow-GRPO code): eta = 0.8, clip 1e-4, beta 0.04.
  precise    Precise (arXiv 2605.23522): eta = 1.5, clip 4e-6, beta 0.
  dance_precise  Precise's exact transition with DanceGRPO's noise level (eta = 0.3) and Precise's rest.
"""
import ml_collections

from experiments.configs import _base

SAMPLER_DEFAULTS = {     # precise first: the configs' default variant
    "precise": {"eta": 1.5, "clip_range": 4e-6, "beta": 0.0, "timestep_fraction": 0.99,
                "same_noise": False, "sde_last_step": False},
    "flow_grpo": {"eta": 0.7, "clip_range": 1e-4, "beta": 0.04, "timestep_fraction": 0.99,
                  "same_noise": False, "sde_last_step": True},
    "dance": {"eta": 0.3, "clip_range": 1e-4, "beta": 0.0, "timestep_fraction": 0.6, "same_noise": True,
              "sde_last_step": True},
    "cps": {"eta": 0.8, "clip_range": 1e-4, "beta": 0.04, "timestep_fraction": 0.99, "same_noise": False,
            "sde_last_step": False},
    "dance_precise": {"eta": 0.3, "clip_range": 4e-6, "beta": 0.0, "timestep_fraction": 0.99,
                      "same_noise": False, "sde_last_step": False},
}
SAMPLERS = tuple(SAMPLER_DEFAULTS)


def grpo_config(preset: str, sampler: str, base: ml_collections.ConfigDict,
                base_name: str) -> ml_collections.ConfigDict:
  """A flow_grpo config for `sampler` fine-tuning the flow_matching config `base`.

  train.global_batch_size is the number of groups (conditions) per step; each has grpo.group_size
  trajectories. The base run is the sibling workdir <base_name>_<preset> of the GRPO run's (a path
relative to the GRPO workdir, as the table scripts lay runs out); the CLI trains it there when missing.
  """
  c = _base.base(preset)
  c.task = "flow_grpo"
  c.base = base
  c.grpo = ml_collections.ConfigDict({
      "base_workdir": f"../{base_name}_{preset}",   # absolute, or relative to the GRPO workdir
      "sampler": sampler,
      "num_steps": 10,              # NFE per trajectory (training and evaluation)
      "shift": 1.0,                 # time_grid shift
      "cfg_scale": 1.0,             # 1: one forward per step (FLUX-like guidance-free sampling)
      "group_size": 16,
      # Optimiser updates per sampled batch, each on a disjoint share of its groups (Flow-GRPO's
      # gradient accumulation covers half an epoch's samples: 2 updates per sampling round).
      "updates_per_batch": 2,
      "adv_eps": 1e-4, "adv_clip": 5.0, "global_std": False,
      "ratio_norm": False,          # GRPO-Guard's RatioNorm (arXiv 2510.22319)
      "window_size": 0,             # 0: SDE on every step but the last; else a window of that many steps
      "window_kind": "sliding",     # sliding (MixGRPO) | random (Flow-GRPO-Fast)
      "window_every": 1,            # sliding: iterations between moves
      "lora_rank": 0, "lora_alpha": 0.0, "lora_patterns": ["block_"],
      "reward": "",
      "eval_size": 1024,
      **SAMPLER_DEFAULTS[sampler],
  })
  # Flow-GRPO's optimiser: AdamW, lr 3e-4 (LoRA), weight decay 1e-4, gradient clip 1, EMA of the policy.
  c.optim.update({"lr": 3e-4, "weight_decay": 1e-4, "grad_clip_norm": 1.0, "schedule": "constant",
                  "warmup_steps": 0, "ema_decay": 0.9})
  c.train.update({"checkpoint_every": 100, "log_every": 10, "eval_every": 20})
  return c
