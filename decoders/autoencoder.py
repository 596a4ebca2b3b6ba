"""PiD's latent space: a convolutional KL autoencoder (latent diffusion's AutoencoderKL, arXiv
2112.10752 Sec. 3 and App. G), registered as the task "autoencoder".

Encoder: conv_in, then per level `num_res_blocks` pre-activation ResBlocks and (but for the last
level) a stride-2 Downsample, two middle ResBlocks, GroupNorm + SiLU + conv_out to 2 x z_channels
(mean and log-variance of a diagonal Gaussian). The decoder mirrors it with nearest-neighbour
Upsample. The downsampling factor is 2^(levels - 1): f8 with four levels, f4 with three. The middle
self-attention of latent diffusion's autoencoder is left out: at these image sizes the conv stack
already sees the whole latent.

Loss (per example, averaged over the batch): L1 reconstruction (mean over pixels) + kl_weight x the KL
to N(0, I) (mean over latent elements) + ssim_weight x (1 - SSIM). `encode` returns the posterior's
mean and log-variance; `latent_scale` in the config (1 / the std of training latents, latent
diffusion's scale_factor) normalises latents for the flow model that samples them.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from flax.typing import Dtype

from core import data, latents, metrics, nn as cnn, registry, train, writers

LOGVAR_RANGE = (-30.0, 20.0)     # latent diffusion's clamp: keeps exp(logvar) finite


class Encoder(nn.Module):
  """[B, H, W, 3] in [-1, 1] -> moments [B, H/f, W/f, 2 z_channels] (mean, log-variance)."""
  channels: tuple[int, ...] = (64, 128, 256, 256)
  num_res_blocks: int = 1
  z_channels: int = 4
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWx3: jax.Array) -> jax.Array:
    kw = dict(num_groups=self.num_groups, dtype=self.dtype)
    h = cnn.Conv(self.channels[0], 3, dtype=self.dtype, name="conv_in")(x_BxHxWx3)
    for level, ch in enumerate(self.channels):
      for i in range(self.num_res_blocks):
        h = cnn.ResBlock(ch, name=f"down{level}_block{i}", **kw)(h)
      if level < len(self.channels) - 1:
        h = cnn.Downsample(ch, dtype=self.dtype, name=f"down{level}_sample")(h)
    for i in range(2):
      h = cnn.ResBlock(name=f"mid_block{i}", **kw)(h)
    h = nn.silu(cnn.group_norm(self.num_groups, h.shape[-1], dtype=self.dtype,
                               param_dtype=jnp.float32, name="norm_out")(h))
    return cnn.Conv(2 * self.z_channels, 3, dtype=self.dtype, name="conv_out")(h)


class Decoder(nn.Module):
  """latent [B, h, w, z_channels] -> image [B, h f, w f, 3] (unbounded; ~[-1, 1] once trained)."""
  channels: tuple[int, ...] = (64, 128, 256, 256)
  num_res_blocks: int = 1
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z_Bxhxwxz: jax.Array) -> jax.Array:
    kw = dict(num_groups=self.num_groups, dtype=self.dtype)
    h = cnn.Conv(self.channels[-1], 3, dtype=self.dtype, name="conv_in")(z_Bxhxwxz)
    for i in range(2):
      h = cnn.ResBlock(name=f"mid_block{i}", **kw)(h)
    for level in reversed(range(len(self.channels))):
      for i in range(self.num_res_blocks + 1):    # one more than the encoder, as latent diffusion
        h = cnn.ResBlock(self.channels[level], name=f"up{level}_block{i}", **kw)(h)
      if level > 0:
        h = cnn.Upsample(self.channels[level], dtype=self.dtype, name=f"up{level}_sample")(h)
    h = nn.silu(cnn.group_norm(self.num_groups, h.shape[-1], dtype=self.dtype,
                               param_dtype=jnp.float32, name="norm_out")(h))
    return cnn.Conv(3, 3, dtype=self.dtype, name="conv_out")(h)


class KLAutoencoder(nn.Module):
  """The autoencoder; `factor` = 2^(len(channels) - 1) pixels per latent cell along each axis."""
  channels: tuple[int, ...] = (64, 128, 256, 256)
  num_res_blocks: int = 1
  z_channels: int = 4
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @property
  def factor(self) -> int:
    return 2 ** (len(self.channels) - 1)

  def setup(self):
    kw = dict(channels=tuple(self.channels), num_res_blocks=self.num_res_blocks,
              num_groups=self.num_groups, dtype=self.dtype)
    self.encoder = Encoder(z_channels=self.z_channels, **kw)
    self.decoder = Decoder(**kw)

  def encode(self, x_BxHxWx3: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [B, H, W, 3] (H, W multiples of factor) -> (mean, logvar), each [B, H/f, W/f, z]."""
    h, w = x_BxHxWx3.shape[1:3]
    if x_BxHxWx3.ndim != 4 or h % self.factor or w % self.factor:
      raise ValueError(f"encode: x must be [B, H, W, 3] with H and W multiples of the factor "
                       f"{self.factor}, got {x_BxHxWx3.shape}")
    mean, logvar = jnp.split(self.encoder(x_BxHxWx3).astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z_Bxhxwxz: jax.Array) -> jax.Array:
    return self.decoder(z_Bxhxwxz).astype(jnp.float32)

  def __call__(self, x_BxHxWx3: jax.Array, eps: jax.Array | None = None):
    """(reconstruction, mean, logvar): decodes mean + exp(logvar / 2) eps (the mean when eps is None)."""
    mean, logvar = self.encode(x_BxHxWx3)
    z = mean if eps is None else mean + jnp.exp(0.5 * logvar) * eps
    return self.decode(z), mean, logvar


def kl_to_standard_normal(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, 1)) per example, averaged over its latent elements: [B]."""
  kl = 0.5 * (mean ** 2 + jnp.exp(logvar) - 1.0 - logvar)
  return kl.reshape(kl.shape[0], -1).mean(axis=1)


def build_model(config: ml_collections.ConfigDict) -> KLAutoencoder:
  mc = config.model
  return KLAutoencoder(channels=tuple(mc.channels), num_res_blocks=int(mc.num_res_blocks),
                       z_channels=int(mc.z_channels), num_groups=int(mc.num_groups),
                       dtype=train.compute_dtype(config.train.compute_dtype))


def losses(model: KLAutoencoder, params, x_BxHxWx3: jax.Array, key: jax.Array,
           config: ml_collections.ConfigDict) -> tuple[jax.Array, dict]:
  """The training loss (scalar) and its terms: "l1", "kl", "ssim" (batch means)."""
  lc = config.loss
  shape = (x_BxHxWx3.shape[0], x_BxHxWx3.shape[1] // model.factor, x_BxHxWx3.shape[2] // model.factor,
           model.z_channels)
  recon, mean, logvar = model.apply({"params": params}, x_BxHxWx3, jax.random.normal(key, shape))
  l1_B = jnp.abs(recon - x_BxHxWx3).reshape(shape[0], -1).mean(axis=1)
  kl_B = kl_to_standard_normal(mean, logvar)
  loss_B = l1_B + float(lc.kl_weight) * kl_B
  ssim_B = jnp.zeros_like(l1_B)
  if float(lc.ssim_weight):
    to01 = lambda x: jnp.clip((x + 1) / 2, 0.0, 1.0)
    ssim_B = metrics.ssim(to01(recon), to01(x_BxHxWx3), data_range=1.0)
    loss_B = loss_B + float(lc.ssim_weight) * (1.0 - ssim_B)
  return loss_B.mean(), {"l1": l1_B.mean(), "kl": kl_B.mean(), "ssim": ssim_B.mean()}


def check_config(config: ml_collections.ConfigDict) -> None:
  """The autoencoder's fields, before anything is built: channels, groups, weights, crop size."""
  mc = config.model
  channels = tuple(int(c) for c in mc.channels)
  if not channels or min(channels) < 1:
    raise ValueError(f"config.model.channels={mc.channels}; expected a non-empty list of positive ints")
  for c in channels:
    if c % min(int(mc.num_groups), c):
      raise ValueError(f"config.model.channels has {c}, not divisible into "
                       f"config.model.num_groups={mc.num_groups} groups")
  for field in ("kl_weight", "ssim_weight"):
    if float(config.loss[field]) < 0:
      raise ValueError(f"config.loss.{field}={config.loss[field]}; expected >= 0")
  registry.check_choices(config, {"data.config": tuple(data.config_names(config.data.name))})
  factor = 2 ** (len(channels) - 1)
  size = int(str(config.data.config).lstrip("s"))
  if size % factor:
    raise ValueError(f"config.data.config={config.data.config!r}: crops of {size} px are not a "
                     f"multiple of the autoencoder's factor {factor}")


@registry.register("autoencoder", check=check_config)
def build(config: ml_collections.ConfigDict, workdir: str | None = None) -> train.Task:
  del workdir     # needs no other run
  model = build_model(config)
  dc = config.data
  size = int(str(dc.config).lstrip("s"))

  def init_params(key):
    return model.init(key, jnp.zeros((1, size, size, 3)))["params"]

  def loss(params, batch, key, carry):
    value, terms = losses(model, params, batch["image"], key, config)
    return value, terms, carry

  train_data = lambda pi, pc: data.flipped_images(config, dc, pi, pc)

  eval_images = data.to_float(
      {"image": data.load_in_memory(dc.name, dc.eval_split, config=dc.config).arrays["image"]
       [:int(config.eval_size)]}, None)["image"]
  # (reconstructions, posterior means) of one chunk of at most 64 eval crops; evaluate and sample use
  # the same shapes, so the hooks compile it once.
  chunk = min(64, len(eval_images))
  run = jax.jit(lambda p, x: model.apply({"params": p}, x)[:2])

  def evaluate(params, step, workdir):
    """PSNR / SSIM of the posterior means' reconstructions of the eval crops (whole chunks of 64),
    and the latents' std."""
    outs = [run(params, eval_images[i:i + chunk])
            for i in range(0, len(eval_images) - chunk + 1, chunk)]
    recon = np.concatenate([np.asarray(r) for r, _ in outs])
    quality = metrics.image_quality(jnp.asarray(recon), jnp.asarray(eval_images[:len(recon)]))
    return {"psnr": quality["psnr"], "ssim": quality["ssim"],
            "latent_std": float(np.concatenate([np.asarray(m) for _, m in outs]).std())}

  def sample(params, step, workdir):
    """Eval crops (top row) over their reconstructions (bottom row): samples/step_<step>.png."""
    n = min(8, chunk)
    recon = np.asarray(run(params, eval_images[:chunk])[0])[:n]
    grid = writers.image_grid(np.concatenate([eval_images[:n], recon]), ncol=n,
                              scale=max(1, -(-64 // size)))
    writers.save_sample(grid, workdir, step)
    return {"grid": grid}

  return train.Task(init_params=init_params, loss=loss, train_data=train_data, evaluate=evaluate,
                    sample=sample)


def Frozen(ae_workdir: str, num_steps: int, field: str) -> latents.FrozenAutoencoder:
  """A finished autoencoder run, frozen, as PiD and the latent flow model use it: `encode` maps images
  [B, h, w, 3] in [-1, 1] to the posterior means scaled to unit variance [B, h/f, w/f, z], `decode`
  maps them back (`core.latents`). ae_workdir: the run; num_steps: the steps it must have finished;
  field: the config field that names it (for the error when it has not)."""
  return latents.FrozenAutoencoder.from_run(
      ae_workdir, num_steps, "autoencoder", field, build_model,
      encode_fn=lambda m, p, x: m.apply({"params": p}, x, method="encode")[0],
      decode_fn=lambda m, p, z: m.apply({"params": p}, z, method="decode"),
      factor=lambda m: m.factor)
