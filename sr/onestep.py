"""SANA-SR's super-resolution models (arXiv 2605.23451; design doc sana_sr.md), task "sr".

config.sr.mode:
  "onestep"       OSEDiff's recipe (arXiv 2406.08177) on SANA's parts: LR -> bicubic x scale -> DC-AE
                  encoder (LoRA) -> z_lr -> one LinearDiT evaluation at the fixed time t* (LoRA on the
                  frozen prior) -> z_sr = z_lr - t* v (the x0 prediction, treating z_lr as x_t*) ->
                  frozen DC-AE decoder. Losses: L2 + ssim_weight (1 - SSIM) against the USM-sharpened
                  HR, plus vsd_weight x variational score distillation: the normalised distribution-
                  matching gradient (x0_fake - x0_prior) / mean|z_sr - x0_prior| at t ~ U[0.02, 0.98]
                  (`core.flow.dm_gradient`), with its own LoRA "fake" score on the frozen prior trained
                  by the flow loss on the (stopped) z_sr, both updated every step, as OSEDiff.
  "multistep"     the baseline: the prior fine-tuned (all weights) into a conditional flow model of
                  the HR latent given z_lr (concatenated to its input channels, their input weights
                  zero-initialised so it starts as the prior), sampled by Euler in sample_steps.
  "pruned"        the trained one-step model (LoRA merged) with heads, Mix-FFN channels and blocks
                  removed by importance (`sr/prune.py`), then re-tuned with the one-step losses.
  "encoder_free"  AdcSR-style (design doc, "Corrections"): z_in = Linear(pixel_unshuffle(LR, f / scale))
                  in place of bicubic + the DC-AE encoder (the projection initialised by least squares
                  to the one-step model's encoder latents), the one-step model's DiT, and the DC-AE
                  decoder pruned to decoder_width of its channels (`prune.shrink_decoder`); trained end
                  to end with the one-step losses plus an L1 distillation of the full decoder's output.
Training pairs: random flips of the HR crops through `sr.degrade` (Real-ESRGAN's second-order
pipeline), per example from the pipeline's seeded rng. Evaluation: the held-out crops degraded with
config.eval_seed; PSNR / SSIM on the Y channel against the original HR crop.
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from flax.core import meta

from core import data, flow, flow_task, metrics, registry, train, writers
from core import latents
from core.nn import lora
from core.nn.conv import pixel_unshuffle
from sr import autoencoding, dcae, degrade, prune

MODES = ("onestep", "multistep", "pruned", "encoder_free")
DEGRADATIONS = {"realesrgan": degrade.REAL_ESRGAN, "adcsr": degrade.ADCSR}
VSD_TIMES = (0.02, 0.98)     # OSEDiff's t ~ U[20, 980) of 1000


def upsample(lr_Bxhxwx3: jax.Array, scale: int) -> jax.Array:
  """Bicubic upsampling by `scale`: the one-step model's input (OSEDiff's first step)."""
  b, h, w, c = lr_Bxhxwx3.shape
  return jax.image.resize(lr_Bxhxwx3, (b, h * scale, w * scale, c), "bicubic")


def run_path(config: ml_collections.ConfigDict, workdir: str | None, field: str) -> str:
  """config.sr.<field> resolved against the run's workdir."""
  return os.path.normpath(os.path.join(workdir or os.curdir, os.path.expanduser(config.sr[field])))


@dataclasses.dataclass
class SR:
  """A SANA-SR model of one mode: what its parameters mean and how they map LR to SR images.

  ae: the frozen DC-AE (scaled latents); dit: the DiT module for the mode's DiT params; base:
  the frozen prior's params (onestep: LoRA is applied to them); decoder: the pruned decoder module
  (encoder_free); t_star, scale, lora_scale, sample_steps from config.sr.
  """
  mode: str
  ae: latents.FrozenAutoencoder
  dit: nn.Module
  base: dict | None
  t_star: float
  scale: int
  lora_scale: float
  sample_steps: int = 0
  decoder: nn.Module | None = None

  @property
  def pixel_factor(self) -> int:
    """LR pixels per latent cell along an axis: the LR size must be a multiple of it."""
    return self.ae.factor // self.scale

  def dit_params(self, params):
    if self.mode == "onestep":
      return lora.merge(self.base, params["dit_lora"], self.lora_scale)
    return params["dit"]

  def encode(self, params, lr_Bxhxwx3: jax.Array) -> jax.Array:
    """z_lr [B, h/(f/scale), ..., c]: the DiT's input for the LR images."""
    if self.mode == "encoder_free":
      x = pixel_unshuffle(lr_Bxhxwx3, self.pixel_factor)
      return x @ params["proj"]["kernel"] + params["proj"]["bias"]
    enc = self.ae.params
    if "enc_lora" in params:
      enc = {**enc, "encoder": lora.merge(enc["encoder"], params["enc_lora"], self.lora_scale)}
    return self.ae.encode(upsample(lr_Bxhxwx3, self.scale), enc)

  def decode(self, params, z: jax.Array) -> jax.Array:
    if self.mode == "encoder_free":
      return self.decoder.apply({"params": params["decoder"]}, z / self.ae.latent_scale)
    return self.ae.decode(z)

  def one_step(self, params, z_lr: jax.Array) -> jax.Array:
    """z_sr = z_lr - t* v(z_lr, t*)."""
    t = jnp.full((z_lr.shape[0],), self.t_star)
    return flow.x0_from_velocity(z_lr, self.dit.apply({"params": self.dit_params(params)}, z_lr, t),
                                 self.t_star)

  def sample(self, params, z_lr: jax.Array, noise: jax.Array) -> jax.Array:
    """multistep: Euler from noise [B, h, w, c] to the HR latent, conditioned on z_lr."""
    p = self.dit_params(params)
    velocity = lambda x, t: self.dit.apply({"params": p}, jnp.concatenate([x, z_lr], -1), t)
    return flow.euler_sample(velocity, noise, flow.time_grid(self.sample_steps))

  def __call__(self, params, lr_Bxhxwx3: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """LR [B, h, w, 3] in [-1, 1] (h, w multiples of `pixel_factor`) -> SR [B, h s, w s, 3]."""
    if lr_Bxhxwx3.ndim != 4 or lr_Bxhxwx3.shape[-1] != 3 or lr_Bxhxwx3.shape[1] % self.pixel_factor \
        or lr_Bxhxwx3.shape[2] % self.pixel_factor:
      raise ValueError(f"SR input must be [B, h, w, 3] with h, w multiples of {self.pixel_factor}; "
                       f"got {lr_Bxhxwx3.shape}")
    z_lr = self.encode(params, lr_Bxhxwx3)
    if self.mode == "multistep":
      key = jax.random.PRNGKey(0) if key is None else key
      z = self.sample(params, z_lr, jax.random.normal(key, z_lr.shape, z_lr.dtype))
    else:
      z = self.one_step(params, z_lr)
    return self.decode(params, z)

  def with_frozen(self, ae_params, base=None) -> "SR":
    """This model with other frozen parameters (the DC-AE's; the prior's for onestep), e.g. traced
    ones, so that `costs` can count a paper-sized model's MACs without materialising it."""
    return dataclasses.replace(self, ae=self.ae.with_params(ae_params),
                               base=self.base if base is None else base)

  def num_params(self, params) -> int:
    """Parameters used at inference: the DiT's (LoRA merged), the encoder's (or the projection) and
    the decoder's."""
    count = metrics.param_count
    dit = count(self.base if self.mode == "onestep" else params["dit"])
    if self.mode == "encoder_free":
      return dit + count(params["proj"]) + count(params["decoder"])
    return dit + count(self.ae.params)


def build_sr(config: ml_collections.ConfigDict, workdir: str | None, params=None) -> SR:
  """The SR model of config (a run's config; its sibling runs resolved against workdir). params: the
  mode's parameters when known (a restored run): a pruned DiT's sizes are read from them."""
  sc = config.sr
  ae = autoencoding.Frozen(run_path(config, workdir, "dcae_workdir"), int(config.dcae.train.num_steps),
                           f"config.sr.dcae_workdir={sc.dcae_workdir!r}")
  dit = flow_task.build_model(config)
  base, decoder = None, None
  if sc.mode == "onestep":
    base = restore_prior(config, workdir)
  if sc.mode == "multistep":
    dit = dit.clone(out_channels=int(config.dcae.model.latent_channels))
  if sc.mode in ("pruned", "encoder_free") and params is not None:
    dit = prune.with_structure(dit, params["dit"])
  if sc.mode == "encoder_free":
    spec = dataclasses.replace(ae.model.spec, widths=narrow_widths(config))
    decoder = dcae.Decoder(spec, kernel_impl=config.dcae.model.kernel_impl)
  return SR(sc.mode, ae, dit, base, float(sc.t_star), int(sc.scale),
            float(sc.lora_alpha) / max(int(sc.lora_rank), 1), int(sc.sample_steps), decoder)


def narrow_widths(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The encoder-free model's decoder widths: decoder_width of each stage's, EfficientViT stages
  rounded to whole heads."""
  mc = config.dcae.model
  return prune.narrow_widths(tuple(int(w) for w in mc.widths), tuple(mc.blocks), int(mc.head_dim),
                             float(config.sr.decoder_width))


def restore_prior(config: ml_collections.ConfigDict, workdir: str | None) -> dict:
  return meta.unbox(train.restore_trained(
      run_path(config, workdir, "prior_workdir"), int(config.prior.train.num_steps), "sr_prior",
      f"config.sr.prior_workdir={config.sr.prior_workdir!r}")[0])


def load(workdir: str) -> tuple[SR, dict, ml_collections.ConfigDict]:
  """(model, EMA params, config) of a trained "sr" run, for the table, the CLI and notebooks."""
  params, config = train.restore_params(workdir)
  return build_sr(config, workdir, params), params, config


# ------------------------------------------------------------------------------------------------
# Data


def degraded_pairs(config: ml_collections.ConfigDict, process_index: int, process_count: int):
  """Batches {"lr": [B, h, w, 3], "hr": [B, H, W, 3] USM target} in [-1, 1]: each HR crop mirrored
  with probability 1/2, then degraded with the example's own rng (`sr.degrade`)."""
  stages, scale = DEGRADATIONS[config.sr.degradation], int(config.sr.scale)

  def transform(example, rng):
    hr = data.random_flip(example, rng)["image"].astype(np.float64) / 255.0
    lr, hr_usm = degrade.degrade(hr, rng, scale, stages)
    return {"lr": lr * 2 - 1, "hr": hr_usm * 2 - 1}

  return data.BatchIterator(
      data.load_in_memory(config.data.name, "train", config=config.data.config),
      global_batch_size=int(config.train.global_batch_size), seed=config.seed,
      process_index=process_index, process_count=process_count, transform=transform)


def eval_pairs(config: ml_collections.ConfigDict, n: int | None = None) -> dict[str, np.ndarray]:
  """The first n held-out HR crops of config.data.eval_config {"hr": original, "lr": degraded with
  config.eval_seed} in [-1, 1]."""
  dc = config.data
  hr = data.load_in_memory(dc.name, dc.eval_split, config=dc.eval_config).arrays["image"]
  hr = hr[:int(config.eval_size) if n is None else n]
  pairs = degrade.degrade_batch(hr, int(config.eval_seed), int(config.sr.scale),
                                DEGRADATIONS[config.sr.degradation])
  return {"hr": hr.astype(np.float32) / 127.5 - 1, "lr": pairs["lr"].astype(np.float32)}


def y_quality(sr_BxHxWx3, hr_BxHxWx3) -> dict[str, float]:
  """Mean PSNR / SSIM on the Y channel (BasicSR's convention) of images in [-1, 1]."""
  to01 = lambda x: jnp.clip((jnp.asarray(x) + 1) / 2, 0.0, 1.0)
  a, b = to01(sr_BxHxWx3), to01(hr_BxHxWx3)
  return {"psnr": float(metrics.psnr(a, b, data_range=1.0, channel="y").mean()),
          "ssim": float(metrics.ssim(a, b, data_range=1.0, channel="y").mean())}


# ------------------------------------------------------------------------------------------------
# Losses and initialisation


def image_losses(sr_img: jax.Array, hr: jax.Array, ssim_weight: float) -> tuple[jax.Array, dict]:
  """L2 + ssim_weight (1 - SSIM) (RGB, images in [-1, 1]), batch means."""
  l2 = jnp.mean((sr_img - hr) ** 2)
  to01 = lambda x: jnp.clip((x + 1) / 2, 0.0, 1.0)
  ssim = metrics.ssim(to01(sr_img), to01(hr), data_range=1.0).mean()
  return l2 + ssim_weight * (1.0 - ssim), {"l2": l2, "ssim": ssim}


def vsd_losses(model: SR, params, z_sr: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(generator's VSD loss, fake score's flow loss) at one t ~ U[0.02, 0.98] per example."""
  k_t, k_eps, k_fake = jax.random.split(key, 3)
  b = z_sr.shape[0]
  t = jax.random.uniform(k_t, (b,), minval=VSD_TIMES[0], maxval=VSD_TIMES[1])
  x_t = flow.interpolate(z_sr, jax.random.normal(k_eps, z_sr.shape), t)
  x_t = jax.lax.stop_gradient(x_t)
  real = flow.x0_from_velocity(x_t, model.dit.apply({"params": model.base}, x_t, t), t)
  fake_params = jax.lax.stop_gradient(lora.merge(model.base, params["fake_lora"], model.lora_scale))
  fake = flow.x0_from_velocity(x_t, model.dit.apply({"params": fake_params}, x_t, t), t)
  vsd = flow.dm_loss(z_sr, flow.dm_gradient(z_sr, real, fake))
  # The fake score: the flow loss of the frozen prior + fake LoRA on the student's (stopped) latents.
  z0 = jax.lax.stop_gradient(z_sr)
  x_f, t_f, _, eps = flow.flow_matching_batch(k_fake, z0, time_kind="logit_normal")
  v = model.dit.apply({"params": lora.merge(model.base, params["fake_lora"], model.lora_scale)}, x_f, t_f)
  return vsd, flow.flow_matching_loss(v, z0, eps)


def sr_losses(model: SR, params, batch: dict, key: jax.Array, config: ml_collections.ConfigDict,
              teacher_decoder=None) -> tuple[jax.Array, dict]:
  """The loss of a batch {"lr", "hr"} and its terms, for every mode."""
  sc = config.sr
  if model.mode == "multistep":
    z_hr = model.ae.encode(batch["hr"])
    z_lr = model.ae.encode(upsample(batch["lr"], model.scale))
    x_t, t, _, eps = flow.flow_matching_batch(key, z_hr, time_kind="logit_normal")
    v = model.dit.apply({"params": params["dit"]}, jnp.concatenate([x_t, z_lr], -1), t)
    loss = flow.flow_matching_loss(v, z_hr, eps)
    return loss, {"flow": loss}
  z_sr = model.one_step(params, model.encode(params, batch["lr"]))
  out = model.decode(params, z_sr)
  loss, terms = image_losses(out, batch["hr"], float(sc.ssim_weight))
  if float(sc.vsd_weight):
    vsd, fake = vsd_losses(model, params, z_sr, key)
    loss = loss + float(sc.vsd_weight) * vsd + fake
    terms.update(vsd=vsd, fake_flow=fake)
  if teacher_decoder is not None:        # encoder_free: distil the full decoder into the pruned one
    target = jax.lax.stop_gradient(teacher_decoder(z_sr))
    distill = jnp.mean(jnp.abs(out - target))
    loss = loss + distill
    terms["decoder_distill"] = distill
  return loss, terms


def calibration_batch(config: ml_collections.ConfigDict, n: int) -> dict[str, np.ndarray]:
  """n training pairs (the first batches of the degraded pipeline): pruning's and the
  projection's calibration data."""
  it = degraded_pairs(config.copy_and_resolve_references(), 0, 1)
  batches = [next(it) for _ in range(-(-n // it.local_batch_size))]
  return {k: np.concatenate([b[k] for b in batches])[:n] for k in ("lr", "hr")}


def init_onestep(config, model: SR, key) -> dict:
  sc = config.sr
  k_dit, k_enc, k_fake = jax.random.split(key, 3)
  rank, patterns = int(sc.lora_rank), list(sc.lora_patterns)
  params = {"dit_lora": lora.init_lora(model.base, patterns, rank, k_dit)}
  if sc.encoder_lora:      # every conv of the encoder (OSEDiff adapts the VAE encoder's layers)
    params["enc_lora"] = lora.init_lora(model.ae.params["encoder"], [r"conv|qkv|proj|fc|project|down"],
                                        rank, k_enc, convs=True)
  if float(sc.vsd_weight):
    params["fake_lora"] = lora.init_lora(model.base, patterns, rank, k_fake)
  return params


def restore_onestep(config, workdir) -> tuple[SR, dict]:
  """The finished one-step run that pruned / encoder_free start from, with its LoRA merged."""
  path = run_path(config, workdir, "onestep_workdir")
  params, teacher_config = train.restore_trained(
      path, int(onestep_config(config).train.num_steps), "sr (onestep)",
      f"config.sr.onestep_workdir={config.sr.onestep_workdir!r}")
  teacher = build_sr(teacher_config, path, params)      # `load` without restoring it twice
  merged = {"dit": teacher.dit_params(params)}
  if "enc_lora" in params:
    merged["enc_lora"] = params["enc_lora"]
  return teacher, merged


def init_from_onestep(config, workdir, model: SR) -> tuple[SR, dict]:
  """pruned / encoder_free: (the model with its DiT's pruned sizes, initial params)."""
  sc = config.sr
  teacher, merged = restore_onestep(config, workdir)
  calib = calibration_batch(config, int(sc.calibration_size))
  lr = jnp.asarray(calib["lr"])
  z_lr = jax.jit(teacher.encode)(merged, lr)
  if sc.mode == "pruned":
    t = jnp.full((len(lr),), model.t_star)
    dit, pruned, _ = prune.prune(model.dit, merged["dit"], z_lr, t, head_fraction=float(sc.prune_heads),
                                 mlp_fraction=float(sc.prune_mlp), num_blocks=int(sc.prune_blocks))
    return dataclasses.replace(model, dit=dit), {**merged, "dit": pruned}
  # encoder_free: the projection by least squares from the unshuffled LR pixels to the encoder's z_lr
  x = np.asarray(pixel_unshuffle(lr, model.pixel_factor)).reshape(-1, 3 * model.pixel_factor ** 2)
  x1 = np.concatenate([x, np.ones((len(x), 1))], 1)
  sol = np.linalg.lstsq(x1, np.asarray(z_lr).reshape(len(x), -1), rcond=None)[0].astype(np.float32)
  full_decoder = model.ae.params["decoder"]
  # Only the narrow decoder's shapes (initialising it eagerly compiled each of its ops: ~10 s).
  small = meta.unbox(jax.eval_shape(model.decoder.init, jax.random.PRNGKey(0), z_lr[:1])["params"])
  params = {"proj": {"kernel": jnp.asarray(sol[:-1]), "bias": jnp.asarray(sol[-1])},
            "dit": merged["dit"], "decoder": prune.shrink_decoder(full_decoder, small)}
  return model, params


# ------------------------------------------------------------------------------------------------
# The task


def check_config(config: ml_collections.ConfigDict) -> None:
  sc = config.sr
  registry.check_choices(config, {"sr.mode": MODES, "sr.degradation": tuple(DEGRADATIONS)})
  autoencoding.check_config(config.dcae)
  flow_task.check_config(config.prior)
  scale, factor = int(sc.scale), 2 ** (len(config.dcae.model.widths) - 1)
  if scale < 1 or factor % scale:
    raise ValueError(f"config.sr.scale={scale} must divide the DC-AE factor {factor}")
  for field in ("config", "eval_config"):
    data.check_config(config.data.name, config.data[field], f"config.data.{field}")
    size = data.crop_size(config.data.name, config.data[field])
    if size % factor:
      raise ValueError(f"config.data.{field}={config.data[field]!r}: HR crops of {size} px must be a "
                       f"multiple of the DC-AE factor {factor}")
  if not 0.0 < float(sc.t_star) <= 1.0:
    raise ValueError(f"config.sr.t_star={sc.t_star}; expected a time in (0, 1]")
  if sc.mode == "multistep" and int(sc.sample_steps) < 1:
    raise ValueError(f"config.sr.sample_steps={sc.sample_steps}; expected >= 1")
  if not 0.0 < float(sc.decoder_width) <= 1.0:
    raise ValueError(f"config.sr.decoder_width={sc.decoder_width}; expected a fraction in (0, 1]")


def onestep_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config of the one-step run that pruned / encoder_free build on (its variant's config)."""
  from experiments.configs import sana_sr        # noqa: PLC0415 (configs are experiments' business)
  return sana_sr.get_config(f"{config.preset},onestep")


def prepare(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Trains the DC-AE and the prior (and, for pruned / encoder_free, the one-step model) when missing."""
  train.ensure_trained(config.dcae, run_path(config, workdir, "dcae_workdir"), "DC-AE")
  prior_path = run_path(config, workdir, "prior_workdir")
  train.ensure_trained(config.prior, prior_path, "prior")
  if config.sr.mode in ("pruned", "encoder_free"):
    train.ensure_trained(onestep_config(config), run_path(config, workdir, "onestep_workdir"), "one-step")


@registry.register("sr", check=check_config, prepare=prepare)
def build(config: ml_collections.ConfigDict, workdir: str | None = None) -> train.Task:
  sc = config.sr
  model = build_sr(config, workdir)
  teacher_decoder = model.ae.decode if sc.mode == "encoder_free" else None
  start = None
  if sc.mode == "multistep":         # the prior, with z_lr's input weights at zero
    prior = restore_prior(config, workdir)
    kernel = prior["patch_embed"]["kernel"]
    start = {"dit": {**prior, "patch_embed": {**prior["patch_embed"], "kernel": jnp.concatenate(
        [kernel, jnp.zeros_like(kernel)], 0)}}}
  elif sc.mode in ("pruned", "encoder_free"):    # data-dependent, so here and not under tracing
    model, start = init_from_onestep(config, workdir, model)

  def init_params(key):
    return init_onestep(config, model, key) if sc.mode == "onestep" else start

  trainable = None
  if sc.mode == "pruned":
    trainable = lambda params: {k: jax.tree.map(lambda _: k == "dit", v) for k, v in params.items()}

  def loss(params, batch, key, carry):
    value, terms = sr_losses(model, params, batch, key, config, teacher_decoder)
    return value, terms, carry

  pairs = eval_pairs(config)
  run = jax.jit(lambda p, lr: model(p, lr))

  def evaluate(params, step, workdir):
    """PSNR / SSIM (Y) of the held-out degraded crops' super-resolution."""
    return y_quality(run(params, pairs["lr"]), pairs["hr"])

  def sample(params, step, workdir):
    """LR (nearest-upsampled), SR and HR crops in three rows: samples/step_<step>.png."""
    n = min(8, len(pairs["hr"]))
    s = int(sc.scale)
    lr_up = np.repeat(np.repeat(pairs["lr"][:n], s, 1), s, 2)
    picture = writers.image_grid(np.concatenate([lr_up, np.asarray(run(params, pairs["lr"][:n])),
                                                 pairs["hr"][:n]]), ncol=n)
    writers.save_sample(picture, workdir, step)
    return {"grid": picture}

  return train.Task(init_params=init_params, loss=loss,
                    train_data=lambda pi, pc: degraded_pairs(config, pi, pc),
                    evaluate=evaluate, sample=sample, trainable=trainable)


def costs(model: SR, params, lr_shape: tuple[int, ...], ae_params=None, base=None) -> dict:
  """{"params": inference parameters, "macs": XLA's MAC count of model(params, LR)} for an LR batch of
  lr_shape (the lowered HLO's cost analysis, `core.metrics.flops`). Params may be abstract
  (jax.ShapeDtypeStruct trees, from jax.eval_shape), the frozen ones passed as ae_params / base."""
  ae_params = model.ae.params if ae_params is None else ae_params
  base = model.base if base is None else base
  lr = jax.ShapeDtypeStruct(lr_shape, jnp.float32)
  run = lambda frozen, p, x: model.with_frozen(*frozen)(p, x)
  macs = metrics.flops(run, (ae_params, base), params, lr)["macs"]
  return {"params": model.with_frozen(ae_params, base).num_params(params), "macs": macs}
