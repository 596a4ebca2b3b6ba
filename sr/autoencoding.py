"""SANA-SR's DC-AE (`sr/dcae.py`) trained for reconstruction, task "dcae", and loaded frozen.

Loss per example, averaged over the batch: L1 (mean over pixels) + ssim_weight x (1 - SSIM). DC-AE's
first training phase (arXiv 2410.10733 Sec. 3.2) uses L1 + LPIPS; no learned perceptual metric
ships its weights offline, so SSIM stands in for LPIPS, as in the rest of this project.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from core import data, latents, metrics, registry, train, writers
from sr import dcae


def spec(model_config: ml_collections.ConfigDict) -> dcae.Spec:
  """The DC-AE of config.model: widths, encoder / decoder depths, blocks, latent channels."""
  return dcae.Spec(tuple(int(w) for w in model_config.widths),
                   tuple(int(d) for d in model_config.encoder_depths),
                   tuple(int(d) for d in model_config.decoder_depths),
                   tuple(str(b) for b in model_config.blocks),
                   int(model_config.latent_channels), int(model_config.head_dim))


def build_model(config: ml_collections.ConfigDict) -> dcae.DCAE:
  return dcae.DCAE(spec(config.model), kernel_impl=config.model.kernel_impl,
                   dtype=train.compute_dtype(config.train.compute_dtype))


def crop_size(config: ml_collections.ConfigDict) -> int:
  return data.crop_size(config.data.name, config.data.config)


def losses(model: dcae.DCAE, params, x_BxHxWx3: jax.Array,
           config: ml_collections.ConfigDict) -> tuple[jax.Array, dict]:
  """The training loss (scalar) and its terms "l1" and "ssim" (batch means), images in [-1, 1]."""
  recon = model.apply({"params": params}, x_BxHxWx3)
  l1_B = jnp.abs(recon - x_BxHxWx3).reshape(x_BxHxWx3.shape[0], -1).mean(axis=1)
  to01 = lambda x: jnp.clip((x + 1) / 2, 0.0, 1.0)
  ssim_B = metrics.ssim(to01(recon), to01(x_BxHxWx3), data_range=1.0)
  loss_B = l1_B + float(config.loss.ssim_weight) * (1.0 - ssim_B)
  return loss_B.mean(), {"l1": l1_B.mean(), "ssim": ssim_B.mean()}


def check_config(config: ml_collections.ConfigDict) -> None:
  """The DC-AE's fields, before anything is built."""
  data.check_config(config.data.name, config.data.config)
  registry.check_choices(config, {"model.kernel_impl": ("auto", "pallas", "xla")})
  s = spec(config.model)          # raises on inconsistent stage lists
  if float(config.loss.ssim_weight) < 0:
    raise ValueError(f"config.loss.ssim_weight={config.loss.ssim_weight}; expected >= 0")
  if crop_size(config) % s.factor:
    raise ValueError(f"config.data.config={config.data.config!r}: crops of {crop_size(config)} px are "
                     f"not a multiple of the DC-AE's factor {s.factor}")


@registry.register("dcae", check=check_config)
def build(config: ml_collections.ConfigDict, workdir: str | None = None) -> train.Task:
  del workdir     # needs no other run
  model, dc, size = build_model(config), config.data, crop_size(config)

  def init_params(key):
    return model.init(key, jnp.zeros((1, size, size, 3)))["params"]

  def loss(params, batch, key, carry):
    value, terms = losses(model, params, batch["image"], config)
    return value, terms, carry

  eval_images = data.to_float(
      {"image": data.load_in_memory(dc.name, dc.eval_split, config=dc.config).arrays["image"]
       [:int(config.eval_size)]}, None)["image"]
  run = jax.jit(lambda p, x: model.apply({"params": p}, x))

  def evaluate(params, step, workdir):
    """PSNR / SSIM of the eval crops' reconstructions."""
    return metrics.image_quality(run(params, eval_images), jnp.asarray(eval_images))

  def sample(params, step, workdir):
    """Eval crops (top row) over their reconstructions (bottom row): samples/step_<step>.png."""
    n = min(8, len(eval_images))
    recon = np.asarray(run(params, eval_images))[:n]
    grid = writers.image_grid(np.concatenate([eval_images[:n], recon]), ncol=n)
    writers.save_sample(grid, workdir, step)
    return {"grid": grid}

  return train.Task(init_params=init_params, loss=loss,
                    train_data=lambda pi, pc: data.flipped_images(config, dc, pi, pc),
                    evaluate=evaluate, sample=sample)


def _encode(model, params, x):
  return model.apply({"params": params}, x, method="encode")


def _decode(model, params, z):
  return model.apply({"params": params}, z, method="decode")


def Frozen(workdir: str, num_steps: int, field: str) -> latents.FrozenAutoencoder:
  """A finished "dcae" run, frozen: `encode` images [B, H, W, 3] in [-1, 1] -> latents scaled to unit
  variance [B, H/f, W/f, c] (`core.latents`), `decode` back. field names the config field that
  points at the run (for the error when it is missing or unfinished)."""
  return latents.FrozenAutoencoder.from_run(workdir, num_steps, "dcae", field, build_model, _encode,
                                            _decode, factor=lambda m: m.spec.factor)


def untrained(model: dcae.DCAE, params=None, latent_scale: float = 1.0) -> latents.FrozenAutoencoder:
  """A DC-AE that no run made (random or abstract params): for benchmarks and cost counts."""
  return latents.FrozenAutoencoder(model, params, None, model.spec.factor, latent_scale, _encode, _decode)
