"""SANA-SR (arXiv 2605.23451): one-step 4x super-resolution with a DC-AE and a LinearDiT (sr/).

Argument `preset[,variant]`; variants (runs they build on are trained first when missing, as
siblings ../sana_sr_<variant>_<preset> of the workdir):
  onestep          (default) the prior LoRA-tuned into a one-step 4x SR model: LR -> bicubic up ->
                   DC-AE encode (LoRA) -> one LinearDiT evaluation at t* -> decode; L2 + SSIM
  onestep_vsd      the same plus OSEDiff's variational score distillation from the frozen prior
  onestep_softmax  the same on the softmax-attention twin of the prior (the quadratic baseline)
  multistep        the baseline: the prior fine-tuned into a conditional flow model of the HR latent
                   given the LR latent, sampled in `sample_steps` Euler steps
  pruned           the one-step model with heads, Mix-FFN channels and blocks pruned by importance,
                   then re-tuned (sr/prune.py)
  encoder_free     AdcSR-style: pixel_unshuffle + a linear projection replace the DC-AE encoder, the
                   decoder is pruned to `decoder_width` of its channels; from the one-step model
  dcae, prior, prior_softmax
                   the DC-AE (reconstruction), the LinearDiT prior on its latents and its twin
  python -m experiments.main --config experiments/configs/sana_sr.py:cpu --workdir runs/sana_sr_onestep_cpu
"""
from experiments.configs import _base

VARIANTS = ("onestep", "onestep_vsd", "onestep_softmax", "multistep", "pruned", "encoder_free",
            "dcae", "prior", "prior_softmax")


def run_dir(variant: str, preset: str) -> str:
  """A sibling run's workdir relative to this one (and the table's name for it under --runs)."""
  return f"../sana_sr_{variant}_{preset}"


def dcae_config(preset: str):
  c = _base.base(preset)
  c.task = "dcae"
  c.data.update({"name": "image_crops", "config": "s64", "eval_split": "eval"})
  # The cpu DC-AE: dc-ae-f32c32-sana-1.0's design (ResBlocks in the early stages, EfficientViT blocks
  # with the 5x5 multi-scale linear attention in the last ones, space-to-channel shortcuts, 32
  # latent channels) with one stage fewer (f16: the design doc's "fewer stages for CPU-sized crops"),
  # 1/16 - 1/8 the widths, one block per stage and none at full resolution (as DC-AE's in/mix
  # variants). Measured on this machine: the f32 CPU_F32C32 of sr/dcae.py took 16 s a training step
  # at batch 16 of 128 px crops; this one 0.55 s at 64 px. It trains on 64 px crops (4x4x32 latents,
  # 24x compression; the paper's f32c32 is 96x) and, being convolutional with global linear
  # attention, runs at any multiple of 16 px.
  c.model.update({"widths": [8, 16, 32, 64, 128], "encoder_depths": [0, 1, 1, 1, 1],
                  "decoder_depths": [0, 1, 1, 1, 1], "blocks": ["res"] * 3 + ["evit"] * 2,
                  "latent_channels": 32, "head_dim": 32, "kernel_impl": "auto"})
  c.loss = {"ssim_weight": 0.2}
  c.eval_size = 64
  c.train.update({"num_steps": 3000, "global_batch_size": 16, "log_every": 100, "eval_every": 1000,
                  "sample_every": 3000, "checkpoint_every": 500})
  c.optim.update({"lr": 1e-3, "warmup_steps": 100, "ema_decay": 0.995})
  if preset == "smoke":
    c.model.update({"widths": [4, 8, 8, 32, 32], "encoder_depths": [1] * 5, "decoder_depths": [1] * 5})
    c.eval_size = 4
    c.train.update({"num_steps": 2, "global_batch_size": 4, "log_every": 1, "eval_every": 2,
                    "sample_every": 2, "checkpoint_every": 2})
    c.optim.update({"warmup_steps": 1})
  elif preset == "paper":    # dc-ae-f32c32-sana-1.0 (design doc sana_sr.md)
    c.model.update({"widths": [128, 256, 512, 512, 1024, 1024], "encoder_depths": [2, 2, 2, 3, 3, 3],
                    "decoder_depths": [3] * 6, "blocks": ["res"] * 3 + ["evit"] * 3})
    c.data.config = "s256"
    c.train.update({"num_steps": 100000, "global_batch_size": 64, "compute_dtype": "bfloat16",
                    "eval_every": 5000, "sample_every": 5000, "checkpoint_every": 2000})
    c.optim.update({"lr": 1e-4, "warmup_steps": 1000, "ema_decay": 0.9999})
  return c


def prior_config(preset: str, attention: str = "linear"):
  """The LinearDiT prior (SANA blocks: adaLN-single, ReLU linear attention of head dim 32, Mix-FFN
  2.5x, no position embedding, patch 1) trained by rectified flow on the DC-AE's latents."""
  c = _base.base(preset)
  c.task = "sr_prior"
  c.data.update({"name": "image_crops", "config": "s64", "field": "latent", "label_field": "",
                 "eval_split": "eval", "random_flip": False})
  c.prior = {"dcae_workdir": run_dir("dcae", preset)}
  c.dcae = dcae_config(preset)
  c.data.config = c.dcae.data.config
  c.model.update({"kind": "dit", "patch_size": 1, "width": 192, "depth": 6, "num_heads": 6,
                  "mlp_ratio": 2.5, "num_classes": 0, "pos_embed": "none", "modulation": "adaln_single",
                  "mlp": "mixffn", "attention": attention})
  c.flow = {"label_drop_prob": 0.0, "cfg_scale": 1.0, "time_kind": "logit_normal", "time_mean": 0.0,
            "time_std": 1.0, "shift": 1.0, "sample_steps": 20, "sample_shift": 1.0, "num_samples": 16,
            "eval_size": 256}
  # cpu: 2000 steps at batch 32 (a step of the 2.9 M-parameter prior on 512 latent tokens).
  c.train.update({"num_steps": 2000, "global_batch_size": 32, "log_every": 100, "eval_every": 1000,
                  "sample_every": 2000, "checkpoint_every": 1000})
  c.optim.update({"lr": 1e-3, "warmup_steps": 100, "ema_decay": 0.995})
  if preset == "smoke":
    c.model.update({"width": 64, "depth": 2, "num_heads": 2})
    c.data.train_limit = 64        # crops encoded for training (all 3072 took ~17 s; 2 steps use 8)
    c.flow.update({"sample_steps": 2, "num_samples": 4, "eval_size": 4})
    c.train.update({"num_steps": 2, "global_batch_size": 4, "log_every": 1, "eval_every": 2,
                    "sample_every": 2, "checkpoint_every": 2})
    c.optim.update({"warmup_steps": 1})
  elif preset == "paper":    # design doc: the 19-block trunk of the 407.95 G construction
    c.model.update({"width": 1152, "depth": 19, "num_heads": 36})
    c.train.update({"num_steps": 100000, "global_batch_size": 256, "compute_dtype": "bfloat16",
                    "eval_every": 5000, "sample_every": 5000, "checkpoint_every": 2000})
    c.optim.update({"lr": 1e-4, "warmup_steps": 1000, "ema_decay": 0.9999})
  return c


def get_config(arg: str = "cpu"):
  preset, variant = _base.parse_arg(arg, VARIANTS)
  if variant == "dcae":
    return dcae_config(preset)
  if variant.startswith("prior"):
    return prior_config(preset, "xla" if variant == "prior_softmax" else "linear")
  softmax = variant == "onestep_softmax"
  prior = "prior_softmax" if softmax else "prior"
  c = _base.base(preset)
  c.task = "sr"
  # Trained on 64 px HR crops (16 px LR), evaluated on the held-out photos' 128 px crops (NIQE needs
  # at least 96 px; every part is convolutional or position-free, so sizes may differ).
  c.data.update({"name": "image_crops", "config": "s64", "eval_split": "eval", "eval_config": "s128"})
  c.dcae = dcae_config(preset)
  c.prior = prior_config(preset, "xla" if softmax else "linear")
  c.model = c.prior.model
  c.sr = {
      "mode": {"multistep": "multistep", "pruned": "pruned", "encoder_free": "encoder_free"}.get(
          variant, "onestep"),
      "scale": 4,
      "dcae_workdir": run_dir("dcae", preset), "prior_workdir": run_dir(prior, preset),
      "onestep_workdir": run_dir("onestep", preset),       # what pruned / encoder_free start from
      # Training pairs: Real-ESRGAN's second-order degradation ("realesrgan", design doc) or
      # AdcSR's milder ranges ("adcsr"), on random flips of the HR crops; the target is the USM HR.
      "degradation": "realesrgan",
      "t_star": 0.999,            # OSEDiff's fixed timestep 999 of 1000, as a rectified-flow time
      # LoRA (OSEDiff: rank 4 on the denoiser and the VAE encoder; the decoder frozen).
      "lora_rank": 4, "lora_alpha": 4.0,
      "lora_patterns": [r"attn/(qkv|out)/kernel", r"mlp/fc[12]/kernel"],
      "encoder_lora": True,
      # Losses: L2 x 1 + SSIM x ssim_weight (SSIM standing in for OSEDiff's LPIPS x 2) + VSD.
      "ssim_weight": 1.0, "vsd_weight": 1.0 if variant == "onestep_vsd" else 0.0,
      "sample_steps": 20,         # multistep
      # pruned: the fraction of heads and of Mix-FFN channels removed (lowest importance first, over
      # all blocks) and the number of whole blocks removed.
      "prune_heads": 0.3, "prune_mlp": 0.3, "prune_blocks": 1,
      "decoder_width": 0.5,       # encoder_free: the decoder's channels kept per stage
      "calibration_size": 64,
  }
  c.eval_size = 28
  c.eval_seed = 1234              # the held-out crops' degradation
  c.train.update({"num_steps": 1500, "global_batch_size": 16, "log_every": 100, "eval_every": 500,
                  "sample_every": 1500, "checkpoint_every": 500})
  c.optim.update({"lr": 5e-4, "warmup_steps": 50, "ema_decay": 0.0})
  if variant in ("multistep", "encoder_free"):   # every weight of the DiT is trained: a smaller step
    c.optim.lr = 2e-4
  if variant == "pruned":         # "a short re-tune"
    c.train.update({"num_steps": 500, "eval_every": 500, "sample_every": 500})
    c.optim.lr = 1e-4
  if preset == "smoke":
    c.data.eval_config = "s64"
    c.eval_size = 2
    c.sr.update({"sample_steps": 2, "calibration_size": 4})
    c.train.update({"num_steps": 2, "global_batch_size": 2, "log_every": 1, "eval_every": 2,
                    "sample_every": 2, "checkpoint_every": 2})
    c.optim.update({"warmup_steps": 1})
  elif preset == "paper":         # OSEDiff's recipe: AdamW 5e-5, 512 px HR
    c.data.update({"config": "s256", "eval_config": "s256"})
    c.train.update({"num_steps": 20000, "global_batch_size": 16, "compute_dtype": "bfloat16",
                    "eval_every": 2000, "sample_every": 2000, "checkpoint_every": 1000})
    c.optim.update({"lr": 5e-5, "warmup_steps": 500})
    c.sr.decoder_width = 0.5625      # design doc: the SANA-1.0 decoder at 0.5625 width, 332 G MACs
  return c
