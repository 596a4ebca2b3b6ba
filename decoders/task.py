"""PiD training (arXiv 2605.23902; design doc pid.md), registered as the task "pid".

config.pid.mode:
  "pretrain"  the pixel DiT alone, an unconditional rectified-flow model of the HR images (the paper
              starts from a pretrained text-to-image pixel DiT; here the caption is a learned null).
  "adapter"   the paper's recipe: a fresh adapter on the frozen backbone of the run
              config.pid.backbone_workdir (trained with config.backbone when missing).
  "full"      the same, with the backbone fine-tuned too.
  "cascade"   the baseline: a pixel diffusion SR model of the same size, the pretrained backbone with
              the bicubic-upsampled autoencoder decode of the latent concatenated to its input
              channels (their input weights zero-initialised, so it starts as the backbone), fully
              fine-tuned: autoencoder decode, then diffusion SR.
The condition: HR crop [-1, 1] -> antialiased bicubic downsampling by config.pid.scale -> the frozen
autoencoder of config.pid.autoencoder_workdir (trained with config.autoencoder when missing) -> its
posterior mean x latent_scale (unit variance on the training crops).

Loss per example (rectified flow in pixel space; `pid_losses`):
  t ~ logit-normal(0, 1), shifted by s = 6 sqrt(sqrt(H W) / 2048) (config.pid.shift = 0) or the
  configured shift; x_t = (1 - t) x0 + t eps; MSE of v against eps - x0.
  The latent is corrupted independently of t: sigma ~ U[0, sigma_max] on a fraction `corrupt_prob`
  of the examples (0 on the rest), z_sigma = (1 - sigma) z + sigma eps'. It is dropped (the model
  runs without the adapter's injections) with probability `drop_prob`, for classifier-free guidance.
  v1.5's colour loss: Charbonnier in YCbCr between the adapter's colour head and the LR image,
  weighted per example by 1 - sigma and overall by `colour_weight`.
Run paths in config.pid are relative to this run's workdir.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.core import meta

from core import data, flow, metrics, registry, train, writers
from decoders import adapter as adapter_lib, autoencoder, pid

MODES = ("pretrain", "adapter", "full", "cascade")
GATE_KINDS = ("channel", "token")

# JPEG's full-range YCbCr from RGB in [0, 1] (ITU-T T.871): Y, Cb - 1/2, Cr - 1/2 rows.
_YCBCR_FROM_RGB = np.array([[0.299, 0.587, 0.114],
                            [-0.168736, -0.331264, 0.5],
                            [0.5, -0.418688, -0.081312]], np.float32)


def rgb_to_ycbcr(rgb01: jax.Array) -> jax.Array:
  """Full-range YCbCr [..., 3] of RGB [..., 3] in [0, 1] (Y in [0, 1], Cb and Cr centred on 1/2)."""
  return rgb01 @ jnp.asarray(_YCBCR_FROM_RGB).T + jnp.asarray([0.0, 0.5, 0.5])


def charbonnier(a: jax.Array, b: jax.Array, eps: float = 1e-3) -> jax.Array:
  """Per-example mean of sqrt((a - b)^2 + eps^2) over all but the first axis: [B]."""
  d = jnp.sqrt((a.astype(jnp.float32) - b.astype(jnp.float32)) ** 2 + eps ** 2)
  return d.reshape(d.shape[0], -1).mean(axis=1)


def colour_loss(pred_lr: jax.Array, lr: jax.Array, sigma_B: jax.Array, eps: float = 1e-3) -> jax.Array:
  """v1.5's auxiliary loss per example [B]: (1 - sigma) x Charbonnier in YCbCr, images in [-1, 1]."""
  ycc = lambda x: rgb_to_ycbcr((x + 1.0) / 2.0)
  return (1.0 - sigma_B) * charbonnier(ycc(pred_lr), ycc(lr), eps)


def downsample(hr_BxHxWx3: jax.Array, scale: int) -> jax.Array:
  """Antialiased bicubic downsampling by an integer scale: [B, H, W, 3] -> [B, H/s, W/s, 3]."""
  b, h, w, c = hr_BxHxWx3.shape
  if h % scale or w % scale:
    raise ValueError(f"HR size {h}x{w} is not divisible by the scale {scale}")
  return jax.image.resize(hr_BxHxWx3, (b, h // scale, w // scale, c), "bicubic", antialias=True)


def corrupt_latent(key: jax.Array, z: jax.Array, *, sigma_max: float,
                   prob: float) -> tuple[jax.Array, jax.Array]:
  """(z_sigma, sigma [B]): sigma ~ U[0, sigma_max] with probability prob, else 0, and
  z_sigma = (1 - sigma) z + sigma eps, the rectified-flow noising a latent sampler stopped at time
  sigma would hand over."""
  k_on, k_sigma, k_eps = jax.random.split(key, 3)
  b = z.shape[0]
  sigma = jnp.where(jax.random.bernoulli(k_on, prob, (b,)),
                    jax.random.uniform(k_sigma, (b,), maxval=sigma_max), 0.0)
  return flow.interpolate(z, jax.random.normal(k_eps, z.shape, z.dtype), sigma), sigma


def pixel_shift(config: ml_collections.ConfigDict, hr_size: int) -> float:
  """The time shift: config.pid.shift, or PiD's 6 sqrt(sqrt(H W) / 2048) when it is 0."""
  shift = float(config.pid.shift)
  return shift or flow.resolution_shift(float(hr_size), base=2048.0, base_shift=6.0)


def hr_size(config: ml_collections.ConfigDict) -> int:
  return int(str(config.data.config).lstrip("s"))


def build_model(config: ml_collections.ConfigDict) -> pid.PiD:
  """The PiD network of config.model (without an adapter in "pretrain" mode)."""
  mc, pc = config.model, config.pid
  dtype = train.compute_dtype(config.train.compute_dtype)
  backbone = pid.PixelDiT(
      patch_size=int(mc.patch_size), width=int(mc.width), depth=int(mc.depth),
      num_heads=int(mc.num_heads), mlp_hidden=int(mc.mlp_hidden), caption_tokens=int(mc.caption_tokens),
      pixel_channels=int(mc.pixel_channels), pixel_depth=int(mc.pixel_depth),
      pixel_width=int(mc.pixel_width), pixel_heads=int(mc.pixel_heads), rope_span=float(mc.rope_span),
      attn_impl=mc.attention, dtype=dtype)
  inject_every = int(mc.adapter.inject_every)
  if pc.mode in ("pretrain", "cascade"):
    return pid.PiD(backbone, None, inject_every)
  ac = mc.adapter
  patch, scale = int(mc.patch_size), int(pc.scale)
  adapter = adapter_lib.Adapter(
      width=int(mc.width), num_injections=-(-int(mc.depth) // inject_every) + 1, hidden=int(ac.hidden),
      num_res_blocks=int(ac.num_res_blocks), num_groups=int(ac.num_groups), gate_kind=ac.gate_kind,
      gate_impl=ac.gate_impl, padding=ac.padding,
      colour_scale=patch // scale if float(pc.colour_weight) else 0, dtype=dtype)
  return pid.PiD(backbone, adapter, inject_every)


def run_path(config: ml_collections.ConfigDict, workdir: str | None, field: str) -> str:
  """config.pid.<field> resolved against this run's workdir."""
  return os.path.normpath(os.path.join(workdir or os.curdir, os.path.expanduser(config.pid[field])))


def decode_and_upsample(encoder: autoencoder.Frozen, z: jax.Array, hr_hw: tuple[int, int]) -> jax.Array:
  """The classic decoder: autoencoder decode of z, clipped to [-1, 1], bicubic-upsampled to hr_hw."""
  lr = jnp.clip(encoder.decode(z), -1.0, 1.0)
  return jax.image.resize(lr, (lr.shape[0], *hr_hw, lr.shape[-1]), "bicubic")


def pid_losses(model: pid.PiD, params, hr_BxHxWx3: jax.Array, key: jax.Array,
               config: ml_collections.ConfigDict, encoder: autoencoder.Frozen | None) -> tuple[jax.Array, dict]:
  """The loss (scalar) and its terms ("flow", "colour", "sigma_lat") for a batch of HR images."""
  pc = config.pid
  k_t, k_lat, k_drop = jax.random.split(key, 3)
  b = hr_BxHxWx3.shape[0]
  x_t, t, _, eps = flow.flow_matching_batch(
      k_t, hr_BxHxWx3, time_kind="logit_normal", mean=float(pc.time_mean), std=float(pc.time_std),
      shift=pixel_shift(config, hr_BxHxWx3.shape[1]))
  terms = {}
  if encoder is None:                              # pretraining: the backbone alone
    v = model.apply({"params": params}, x_t, t)
    colour_B = jnp.zeros((b,))
  elif pc.mode == "cascade":
    z = encoder.encode(downsample(hr_BxHxWx3, int(pc.scale)))
    cond = jax.lax.stop_gradient(decode_and_upsample(encoder, z, hr_BxHxWx3.shape[1:3]))
    v = model.apply({"params": params}, x_t, t, image_cond=cond)
    colour_B = jnp.zeros((b,))
  else:
    lr = downsample(hr_BxHxWx3, int(pc.scale))
    z = jax.lax.stop_gradient(encoder.encode(lr))
    z_sigma, sigma = corrupt_latent(k_lat, z, sigma_max=float(pc.sigma_max), prob=float(pc.corrupt_prob))
    keep = 1.0 - jax.random.bernoulli(k_drop, float(pc.drop_prob), (b,)).astype(jnp.float32)
    if pc.mode == "adapter":    # no gradient through the frozen backbone (the optimiser freezes it too)
      params = {**params, "backbone": jax.lax.stop_gradient(params["backbone"])}
    v, colour = model.apply({"params": params}, x_t, t, z_sigma, sigma, keep, return_colour=True)
    colour_B = (colour_loss(colour, lr, sigma) if colour is not None else jnp.zeros((b,)))
    terms["sigma_lat"] = sigma.mean()
  flow_loss = flow.flow_matching_loss(v, hr_BxHxWx3, eps)
  loss = flow_loss + float(pc.colour_weight) * colour_B.mean()
  return loss, {"flow": flow_loss, "colour": colour_B.mean(), **terms}


def decode(model: pid.PiD, params, latent, sigma_B, noise_BxHxWx3, grid, cfg_scale: float = 1.0, *,
           image_cond: jax.Array | None = None):
  """PiD's sampler: Euler along `grid` from noise to the HR image [B, H, W, 3], conditioned on the
  latent at noise level sigma_B; with cfg_scale != 1, guided against the latent-free model. With
  latent None: the backbone alone, or the cascade conditioned on image_cond."""
  b = noise_BxHxWx3.shape[0]
  sigma_B = jnp.broadcast_to(jnp.asarray(sigma_B, jnp.float32), (b,))
  if latent is None:
    velocity = lambda x, t: model.apply({"params": params}, x, t, image_cond=image_cond)
  elif cfg_scale == 1.0:
    velocity = lambda x, t: model.apply({"params": params}, x, t, latent, sigma_B)
  else:
    fn = lambda x, t, c: model.apply({"params": params}, x, t, *c)
    velocity = flow.guided(fn, (latent, sigma_B, jnp.ones((b,))), (latent, sigma_B, jnp.zeros((b,))),
                           cfg_scale)
  return flow.euler_sample(velocity, noise_BxHxWx3, grid)


def widen_inputs(fresh_boxed, pretrained, patch: int):
  """The pretrained backbone in the fresh (boxed) tree of a backbone whose input has extra channels:
  the input weights of the new channels (patch and pixel embeddings) are zero, so it computes exactly
  what the pretrained backbone does until they are trained."""
  fresh = meta.unbox(fresh_boxed)
  inputs = ("patch_embed", "pixel_embed")
  rest = lambda tree: jax.tree.map(jnp.shape, {k: v for k, v in tree.items() if k not in inputs})
  old_c, new_c = (tree["pixel_embed"]["kernel"].shape[0] for tree in (pretrained, fresh))
  if rest(fresh) != rest(pretrained) or new_c < old_c:
    raise ValueError("the backbone run has a different architecture from config.model; pretrain it "
                     "with the same config.model")
  pk, ek = fresh["patch_embed"]["kernel"], fresh["pixel_embed"]["kernel"]
  zeros = lambda shape: jnp.zeros(shape, pk.dtype)
  old_p = pretrained["patch_embed"]["kernel"].reshape(patch * patch, old_c, -1)   # (row, col, channel)
  out = dict(pretrained)
  out["patch_embed"] = {**pretrained["patch_embed"], "kernel": jnp.concatenate(
      [old_p, zeros((patch * patch, new_c - old_c, old_p.shape[-1]))], axis=1).reshape(pk.shape)}
  out["pixel_embed"] = {**pretrained["pixel_embed"], "kernel": jnp.concatenate(
      [pretrained["pixel_embed"]["kernel"], zeros((new_c - old_c, ek.shape[1]))])}
  return meta.replace_boxed(fresh_boxed, out)


def check_config(config: ml_collections.ConfigDict) -> None:
  """PiD's fields (and the autoencoder's and backbone's runs'), before anything is built."""
  pc, mc = config.pid, config.model
  registry.check_choices(config, {"pid.mode": MODES, "model.adapter.gate_kind": GATE_KINDS,
                                  "model.adapter.padding": ("zeros", "replicate")})
  registry.check_choices(config, {"data.config": tuple(data.config_names(config.data.name))})
  size, patch, scale = hr_size(config), int(mc.patch_size), int(pc.scale)
  if size % patch or size % scale:
    raise ValueError(f"config.data.config={config.data.config!r}: HR crops of {size} px must be "
                     f"multiples of config.model.patch_size={patch} and config.pid.scale={scale}")
  if int(mc.pixel_channels) % 4:
    raise ValueError(f"config.model.pixel_channels={mc.pixel_channels}; expected a multiple of 4")
  for field, lo, hi in (("sigma_max", 0.0, 1.0), ("corrupt_prob", 0.0, 1.0), ("drop_prob", 0.0, 1.0)):
    if not lo <= float(pc[field]) <= hi:
      raise ValueError(f"config.pid.{field}={pc[field]}; expected a value in [{lo}, {hi}]")
  if pc.mode != "pretrain":
    if float(pc.colour_weight) and patch % scale and pc.mode != "cascade":
      raise ValueError(f"the colour head needs config.model.patch_size={patch} to be a multiple of "
                       f"config.pid.scale={scale} (LR pixels per patch); or set config.pid.colour_weight=0")
    factor = 2 ** (len(config.autoencoder.model.channels) - 1)
    latent, grid = size // scale // factor, size // patch
    if latent == 0 or (grid % latent and latent % grid):
      raise ValueError(f"a {size} px image at scale {scale} has a {latent}x{latent} latent (AE factor "
                       f"{factor}), which cannot be aligned to the {grid}x{grid} patch grid")
    autoencoder.check_config(config.autoencoder)
    check_config(config.backbone)


def prepare(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Trains the autoencoder and (adapter / full modes) the pretrained backbone when missing."""
  if config.pid.mode == "pretrain":
    return
  train.ensure_trained(config.autoencoder, run_path(config, workdir, "autoencoder_workdir"),
                       "autoencoder")
  train.ensure_trained(config.backbone, run_path(config, workdir, "backbone_workdir"), "backbone")


def load_encoder(config: ml_collections.ConfigDict, workdir: str | None) -> autoencoder.Frozen:
  return autoencoder.Frozen(run_path(config, workdir, "autoencoder_workdir"),
                 int(config.autoencoder.train.num_steps),
                 f"config.pid.autoencoder_workdir={config.pid.autoencoder_workdir!r}")


@registry.register("pid", check=check_config, prepare=prepare)
def build(config: ml_collections.ConfigDict, workdir: str | None = None) -> train.Task:
  pc, dc = config.pid, config.data
  model = build_model(config)
  size, scale = hr_size(config), int(pc.scale)
  encoder = None if pc.mode == "pretrain" else load_encoder(config, workdir)
  if encoder is not None:
    backbone_params = train.restore_trained(
        run_path(config, workdir, "backbone_workdir"), int(config.backbone.train.num_steps), "backbone",
        f"config.pid.backbone_workdir={pc.backbone_workdir!r}")[0]["backbone"]
  lat = None if encoder is None else size // scale // encoder.factor

  def init_params(key):
    x, t = jnp.zeros((1, size, size, 3)), jnp.full((1,), 0.5)
    if encoder is None:
      return model.init(key, x, t)["params"]
    if pc.mode == "cascade":
      return {"backbone": widen_inputs(model.init(key, x, t, image_cond=x)["params"]["backbone"],
                                       backbone_params, int(config.model.patch_size))}
    z = jnp.zeros((1, lat, lat, int(encoder.config.model.z_channels)))
    params = model.init(key, x, t, z, jnp.zeros((1,)))["params"]
    fresh = jax.tree.map(jnp.shape, meta.unbox(params["backbone"]))
    if fresh != jax.tree.map(jnp.shape, backbone_params):
      raise ValueError(f"the backbone run {pc.backbone_workdir!r} has a different architecture from "
                       "config.model; pretrain it with the same config.model")
    # The pretrained values in the fresh tree's logical-axis boxes (which `core.sharding` reads).
    return {**params, "backbone": meta.replace_boxed(params["backbone"], backbone_params)}

  def loss(params, batch, key, carry):
    value, terms = pid_losses(model, params, batch["image"], key, config, encoder)
    return value, terms, carry

  trainable = None
  if pc.mode == "adapter":
    trainable = lambda params: {k: jax.tree.map(lambda _: k == "adapter", v) for k, v in params.items()}

  train_data = lambda pi, pc: data.flipped_images(config, dc, pi, pc)

  eval_hr = data.to_float({"image": data.load_in_memory(dc.name, dc.eval_split, config=dc.config)
                           .arrays["image"][:int(config.eval_size)]}, None)["image"]
  eval_loss = jax.jit(lambda p, k: pid_losses(model, p, eval_hr, k, config, encoder)[1])
  grid = flow.time_grid(int(pc.sample_steps), shift=pixel_shift(config, size))
  noise = jax.random.normal(jax.random.PRNGKey(4321), eval_hr.shape)

  @jax.jit
  def eval_decode(params):
    latent = None if encoder is None else encoder.encode(downsample(eval_hr, scale))
    if pc.mode == "cascade":
      return decode(model, params, None, 0.0, noise, grid,
                    image_cond=decode_and_upsample(encoder, latent, eval_hr.shape[1:3]))
    return decode(model, params, latent, 0.0, noise, grid, float(pc.cfg_scale))

  def evaluate(params, step, workdir):
    """The flow loss over 4 fixed draws; with an adapter, PSNR / SSIM of decoded eval crops."""
    keys = jax.random.split(jax.random.PRNGKey(1234), 4)
    out = {"flow_loss": float(np.mean([eval_loss(params, k)["flow"] for k in keys]))}
    if encoder is not None:
      out.update(metrics.image_quality(eval_decode(params), eval_hr))
    return out

  def sample(params, step, workdir):
    """Decoded eval crops (pretrain: unconditional samples) over the HR crops: samples/step_<n>.png."""
    n = min(8, len(eval_hr))
    picture = writers.image_grid(np.concatenate([np.asarray(eval_decode(params))[:n], eval_hr[:n]]),
                                 ncol=n)
    writers.save_sample(picture, workdir, step)
    return {"grid": picture}

  return train.Task(init_params=init_params, loss=loss, train_data=train_data, evaluate=evaluate,
                    sample=sample, trainable=trainable)
