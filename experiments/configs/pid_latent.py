"""The latent generator for PiD's early exit: a DiT trained by rectified flow on the latents of the
autoencoder run ../pid_autoencoder_<preset> (pid_autoencoder.py; trained first when missing).

Preset: `smoke | cpu | paper`:
  python -m experiments.main --config experiments/configs/pid_latent.py:cpu --workdir runs/pid_latent_cpu
"""
from experiments.configs import _base, flow_images, pid_autoencoder


def get_config(arg: str = "cpu"):
  preset, _ = _base.parse_arg(arg)
  c = flow_images.get_config(f"{preset},image_crops")
  c.task = "latent_flow"
  # The autoencoder's 32 px crops, encoded: f8 latents 4x4x4 at unit variance (latent_scale).
  c.data.update({"field": "latent", "random_flip": False})
  c.latent = {"autoencoder_workdir": f"../pid_autoencoder_{preset}"}
  c.autoencoder = pid_autoencoder.get_config(preset)
  c.data.config = c.autoencoder.data.config
  # One latent cell per token (patch 1): 16 tokens.
  c.model.patch_size = 1
  if preset == "smoke":
    c.data.train_limit = 64        # crops encoded for training (all 6144 took ~10 s; 6 steps use 96)
  return c
