"""The latent generator PiD decodes from, and its early exit (arXiv 2605.23902; design doc pid.md).

Task "latent_flow": the `core.flow_task` DiT trained by rectified flow on the scaled posterior means of
the autoencoder run config.latent.autoencoder_workdir (relative to this run's workdir; trained with
config.autoencoder when missing). Training latents are the encoded crops and their mirror images
(a flip of the image, not of the latent); its sample hook decodes the samples to images.

Early exit (`early_exit`): the latent sampler integrates from t = 1 down to sigma_exit instead of 0 and
hands over x_{sigma_exit} = (1 - sigma_exit) z + sigma_exit eps (in distribution), which PiD decodes
with sigma_lat = sigma_exit; the steps of the full grid below sigma_exit are saved.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from core import flow, flow_task, latents, registry, train
from decoders import autoencoder


def exit_grid(num_steps: int, shift: float, sigma_exit: float) -> np.ndarray:
  """The full sampler grid time_grid(num_steps, shift) cut at sigma_exit: its times above sigma_exit,
  then sigma_exit itself. float32 [k + 1]; k = the latent NFE (num_steps when sigma_exit = 0)."""
  if not 0.0 <= sigma_exit < 1.0:
    raise ValueError(f"sigma_exit={sigma_exit}; expected a value in [0, 1)")
  full = np.asarray(flow.time_grid(num_steps, shift=shift))
  return np.append(full[full > sigma_exit], np.float32(sigma_exit)).astype(np.float32)


def early_exit(velocity_fn, x_T: jax.Array, num_steps: int, shift: float, sigma_exit: float):
  """(latent at t = sigma_exit [B, ...], sigma_lat [B] = sigma_exit, latent NFE) by Euler steps of
  velocity_fn (x, t_B) -> v along `exit_grid`."""
  grid = exit_grid(num_steps, shift, sigma_exit)
  z = flow.euler_sample(velocity_fn, x_T, jnp.asarray(grid))
  return z, jnp.full((x_T.shape[0],), grid[-1], jnp.float32), len(grid) - 1


def autoencoder_path(config: ml_collections.ConfigDict, workdir: str | None) -> str:
  return os.path.normpath(os.path.join(workdir or os.curdir,
                                       os.path.expanduser(config.latent.autoencoder_workdir)))


def load_autoencoder(config: ml_collections.ConfigDict, workdir: str | None) -> autoencoder.Frozen:
  return autoencoder.Frozen(autoencoder_path(config, workdir), int(config.autoencoder.train.num_steps),
                            f"config.latent.autoencoder_workdir={config.latent.autoencoder_workdir!r}")


def check_config(config: ml_collections.ConfigDict) -> None:
  latents.check_latent_data(config.data)
  flow_task.check_config(config)
  autoencoder.check_config(config.autoencoder)


def prepare(config: ml_collections.ConfigDict, workdir: str) -> None:
  train.ensure_trained(config.autoencoder, autoencoder_path(config, workdir), "autoencoder")


@registry.register("latent_flow", check=check_config, prepare=prepare)
def build(config: ml_collections.ConfigDict, workdir: str | None = None) -> train.Task:
  frozen = load_autoencoder(config, workdir)
  return flow_task.make_task(config, latents.encoded_sources(config.data, frozen.encode),
                             to_image=jax.jit(frozen.decode))
