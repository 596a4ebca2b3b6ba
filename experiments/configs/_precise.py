"""The GRPO fields shared by `precise_2d` and `precise_digits` (task "flow_grpo", flowrl/task.py): the
training recipes as data.

Two recipes, selected by the config's variant (`<sampler>` or `<sampler>_published`):
  matched    Precise's comparison (its public `config/flux2_klein.py`, "matched training recipes"):
             one trainer for every sampler, only the sampler and its noise level differ. KL 0, every
             trainable step trained, different noise per sample, per-prompt std, ratio normalisation
             (the sbar-normalised ratio, each step's loss divided by |d mean / d v|), clip 4e-6 at
             FLUX.2 Klein's latent size; eta: Flow-GRPO 0.7, Dance 0.3, CPS 0.7, Precise 1.5.
  published  each sampler with the recipe of its own paper / code:
             flow_grpo  Flow-GRPO (arXiv 2505.05470): a = 0.7, clip 1e-4, beta 0.04, 99% of steps.
             dance      DanceGRPO (arXiv 2505.07818): eta 0.3, clip 1e-4, beta 0, same noise per
                        group, 60% of steps.
             cps        FlowCPS (arXiv 2509.05952, on the Flow-GRPO code): eta 0.8, clip 1e-4, beta 0.04.
             precise    Precise (arXiv 2605.23522): eta 1.5, clip 4e-6, beta 0, ratio normalisation.
In both, `sde_last_step` (the step to t = 0 sampled with the SDE and never trained) is on for
Flow-GRPO and Dance, whose pipelines end on a noisy step; CPS's and Precise's step there is
deterministic. `dance_precise` (Precise's exact transition at DanceGRPO's noise level) exists in the
matched recipe only.

The clip range is per dimension count: PPO clips a log-ratio that is averaged over the D dimensions
of a sample (as every public flow-GRPO code does), whose spread across samples falls as 1 / sqrt(D)
for the same per-dimension change of the policy. `clip_range` is the published value at the
published model's D (`clip_ref_dim`, the latent's size at 512 px, or DanceGRPO's 720 px); the task
clips at clip_range * sqrt(clip_ref_dim / D) (flowrl.task.effective_clip_range), the same relative
tightness on a 2-D point as on a 131k-dimensional latent. clip_ref_dim 0 clips at clip_range as given.
"""
import ml_collections

from experiments.configs import _base

# Latent sizes (channels x height x width) of the published models at their training resolution.
FLUX2_KLEIN_512 = 32 * 64 * 64          # Precise: FLUX.2 Klein 4B at 512 px
SD35_512 = 16 * 64 * 64                 # Flow-GRPO and FlowCPS: SD3.5-M at 512 px
FLUX1_720 = 16 * 90 * 90                # DanceGRPO: FLUX.1-dev at 720 px

MATCHED = {"clip_range": 4e-6, "clip_ref_dim": FLUX2_KLEIN_512, "beta": 0.0, "timestep_fraction": 0.99,
           "same_noise": False, "ratio_norm": True}
MATCHED_ETA = {"precise": 1.5, "flow_grpo": 0.7, "dance": 0.3, "cps": 0.7, "dance_precise": 0.3}
PUBLISHED = {
    "precise": {"eta": 1.5, "clip_range": 4e-6, "clip_ref_dim": FLUX2_KLEIN_512, "beta": 0.0,
                "timestep_fraction": 0.99, "same_noise": False, "ratio_norm": True},
    "flow_grpo": {"eta": 0.7, "clip_range": 1e-4, "clip_ref_dim": SD35_512, "beta": 0.04,
                  "timestep_fraction": 0.99, "same_noise": False, "ratio_norm": False},
    "dance": {"eta": 0.3, "clip_range": 1e-4, "clip_ref_dim": FLUX1_720, "beta": 0.0,
              "timestep_fraction": 0.6, "same_noise": True, "ratio_norm": False},
    "cps": {"eta": 0.8, "clip_range": 1e-4, "clip_ref_dim": SD35_512, "beta": 0.04,
            "timestep_fraction": 0.99, "same_noise": False, "ratio_norm": False},
}
NOISY_LAST_STEP = ("flow_grpo", "dance")
SAMPLERS = tuple(MATCHED_ETA)                 # precise first: the configs' default variant
# The config variants: "<sampler>" (matched recipe) and "<sampler>_published".
VARIANTS = SAMPLERS + tuple(f"{s}_published" for s in PUBLISHED)


def recipe(variant: str) -> tuple[str, str, dict]:
  """(sampler, recipe name, the grpo fields of that recipe) of a config variant."""
  sampler, _, published = variant.partition("_published")
  if variant.endswith("_published"):
    fields, name = dict(PUBLISHED[sampler]), "published"
  else:
    sampler, fields, name = variant, {**MATCHED, "eta": MATCHED_ETA[variant]}, "matched"
  return sampler, name, {**fields, "sde_last_step": sampler in NOISY_LAST_STEP}


def grpo_config(preset: str, variant: str, base: ml_collections.ConfigDict,
                base_name: str) -> ml_collections.ConfigDict:
  """A flow_grpo config for the variant's sampler and recipe, fine-tuning the flow_matching config `base`.

  train.global_batch_size is the number of groups (conditions) per step; each has grpo.group_size
  trajectories. The base run is the sibling workdir <base_name>_<preset> of the GRPO run's (a path
  relative to the GRPO workdir, as the table scripts lay runs out); the CLI trains it there when missing.
  """
  sampler, recipe_name, fields = recipe(variant)
  c = _base.base(preset)
  c.task = "flow_grpo"
  c.base = base
  c.grpo = ml_collections.ConfigDict({
      "base_workdir": f"../{base_name}_{preset}",   # absolute, or relative to the GRPO workdir
      "sampler": sampler,
      "recipe": recipe_name,        # a label: the fields below are what the trainer reads
      "num_steps": 10,              # NFE per trajectory (training, and the short ODE evaluation)
      "shift": 1.0,                 # time_grid shift
      "cfg_scale": 1.0,             # 1: one forward per step (FLUX-like guidance-free sampling)
      "group_size": 16,
      # Optimiser updates per sampled batch, each on a disjoint share of its groups (Flow-GRPO's and
      # Precise's gradient accumulation covers half an epoch's samples: 2 updates per sampling round).
      "updates_per_batch": 2,
      "adv_eps": 1e-4, "adv_clip": 5.0, "global_std": False,
      "window_size": 0,             # 0: SDE on every step but the last; else a window of that many steps
      "window_kind": "sliding",     # sliding (MixGRPO) | random (Flow-GRPO-Fast)
      "window_every": 1,            # sliding: iterations between moves
      "lora_rank": 0, "lora_alpha": 0.0, "lora_patterns": ["block_"],
      "reward": "",
      "eval_size": 1024,
      "eval_long_nfe": 40,          # the long ODE evaluation (Flow-GRPO's and FlowCPS's 40 NFE)
      **fields,
  })
  # Flow-GRPO's optimiser: AdamW, lr 3e-4 (LoRA), weight decay 1e-4, gradient clip 1, EMA of the policy.
  c.optim.update({"lr": 3e-4, "weight_decay": 1e-4, "grad_clip_norm": 1.0, "schedule": "constant",
                  "warmup_steps": 0, "ema_decay": 0.9})
  c.train.update({"checkpoint_every": 100, "log_every": 10, "eval_every": 20})
  return c
