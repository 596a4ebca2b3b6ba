"""PiD's latent space: the convolutional KL autoencoder (decoders/autoencoder.py) on image_crops.

Preset: `smoke | cpu | paper`, optionally `,f4` for a factor-4 autoencoder (default f8), or `,f16c16`
for a deeper factor-16 one with 16 latent channels (the same compression as f8 with 4: PiD's second
latent space, standing in for the paper's semantic encoders, which cannot be downloaded here):
  python -m experiments.main --config experiments/configs/pid_autoencoder.py:cpu --workdir runs/ae_f8
"""
from experiments.configs import _base

VARIANTS = ("f8", "f4", "f16c16")          # the downsampling factor (and latent channels)


def get_config(arg: str = "cpu"):
  preset, factor = _base.parse_arg(arg, VARIANTS)
  c = _base.base(preset)
  c.task = "autoencoder"
  # 32 px crops: what PiD encodes at our scale (the 4x-downsampled 128 px HR images).
  c.data.update({"name": "image_crops", "config": "s32", "eval_split": "eval"})
  levels = {"f8": 4, "f4": 3, "f16c16": 5}[factor]
  # Channels per level (the factor is 2^(levels - 1)); 4 latent channels as SD's f8 VAE.
  c.model.update({"channels": [16, 32, 64, 64, 64][:levels], "num_res_blocks": 1,
                  "z_channels": 16 if factor == "f16c16" else 4, "num_groups": 8})
  # Per-element means: a KL weight of 1e-4 keeps the posterior close to deterministic (latent
  # diffusion's "small KL") while bounding the latents' scale; SSIM off (a knob).
  c.loss = {"kl_weight": 1e-4, "ssim_weight": 0.0}
  c.eval_size = 256
  # cpu, f8: 3000 steps at 5.5 steps/s on this 2-core machine (513 s of training) reach PSNR 24.8 dB,
  # SSIM 0.60 on the eval photos' crops (EMA; `--mode eval` on the run reproduces them).
  c.train.update({"num_steps": 3000, "global_batch_size": 16, "log_every": 100, "eval_every": 1000,
                  "sample_every": 1000, "checkpoint_every": 500})
  c.optim.update({"lr": 5e-4, "warmup_steps": 100, "ema_decay": 0.999})
  if preset == "smoke":
    c.model.update({"channels": [8, 16, 16, 16, 16][:levels], "num_groups": 4})
    c.eval_size = 16
    c.train.update({"num_steps": 4, "global_batch_size": 8, "log_every": 2, "eval_every": 2,
                    "sample_every": 2, "checkpoint_every": 2})
    c.optim.update({"warmup_steps": 1})
  elif preset == "paper":   # SD's f8 VAE widths (arXiv 2112.10752 App. G): 128-256-512-512, 2 blocks
    c.model.update({"channels": [128, 256, 512, 512, 512][:levels], "num_res_blocks": 2,
                    "num_groups": 32})
    c.data.config = "s256"
    c.train.update({"num_steps": 100000, "global_batch_size": 64, "compute_dtype": "bfloat16",
                    "eval_every": 5000, "sample_every": 5000, "checkpoint_every": 5000})
    c.optim.update({"lr": 1e-4, "warmup_steps": 1000, "ema_decay": 0.9999})
  return c
