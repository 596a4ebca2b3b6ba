"""DMD2 distillation of the PiD teacher to a 4-step student (arXiv 2405.14867; PiD's released recipe,
design doc pid.md "Corrections"), registered as the task "pid_distill".

Parameters {"student", "fake", "head", "teacher"}: student and fake score start as copies of the
teacher run config.distill.teacher_workdir (trained with config.teacher when missing); the teacher is
frozen; "head" is the GAN discriminator head on the teacher's features. Iteration n (the carry counts
them) updates the student when n % 6 == 5 and the fake score (and head) otherwise: fake-score updates
on 5 of every 6 iterations (`Task.update_groups`, each group with its own optimiser state).

Student: x0 = x_t - t v_student(x_t, t | latent) at a time t_k of the 4-step schedule
[0.999, 0.866, 0.634, 0.342], on the real HR image noised to t_k (student_input "real": the released
default) or on its own backward simulation from noise to t_k (student_input "backward"). Sampling runs
the schedule with re-noising: x0 = x - t_k v, then x = (1 - t_{k+1}) x0 + t_{k+1} eps'.
Student update: perturb x0 at t' ~ logit-normal(0, 1) clamped to [0.02, 0.99]; the teacher (CFG 3
against the latent-free model) and the fake score give x0_real and x0_fake there, and
  grad = (x0_fake - x0_real) / mean |x0 - x0_real|        (per example, float64, nan_to_num)
  L_DM = 1/2 mean (x0 - stop_gradient(x0 - grad))^2        (so dL/dx0 = grad / size)
plus gan_weight x softplus(-D(x_t')) after gan_warmup iterations when the GAN term is on.
Fake-score update: the flow loss on the student's (stopped) samples; with the GAN term the head also
takes the non-saturating discriminator loss softplus(D(fake)) + softplus(-D(real)) on noised student
and real images, plus r1_weight x the approximate R1 penalty (D(real) - D(real + r1_sigma n))^2.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from core import data, flow, metrics, registry, train, writers
from decoders import task as pid_task

STUDENT_SCHEDULE = (0.999, 0.866, 0.634, 0.342, 0.0)
STUDENT_INPUTS = ("real", "backward")
GEN_PERIOD = 6        # the student steps once every GEN_PERIOD iterations, the fake score the others


def is_student_step(n) -> jax.Array:
  return n % GEN_PERIOD == GEN_PERIOD - 1


def perturbation_time(key: jax.Array, batch: int) -> jax.Array:
  """t' ~ logit-normal(0, 1) clamped to [0.02, 0.99] (the released recipe): [batch]."""
  return jnp.clip(flow.sample_time(key, batch, kind="logit_normal"), 0.02, 0.99)


def renoise(x0: jax.Array, t, key: jax.Array) -> jax.Array:
  """x_t = (1 - t) x0 + t eps' with fresh noise (the student's multi-step sampling)."""
  return flow.interpolate(x0, jax.random.normal(key, x0.shape, x0.dtype), t)


def student_sample(x0_fn, noise: jax.Array, key: jax.Array, schedule=STUDENT_SCHEDULE) -> jax.Array:
  """The student's few-step sampler: x0 = x0_fn(x, t_k) at each time of the schedule, re-noised to the
  next one; x starts as the noise at schedule[0]. Returns the last x0 [B, ...] (NFE = len - 1)."""
  x = noise
  x0 = noise
  for k, (t, s) in enumerate(zip(schedule[:-1], schedule[1:])):
    x0 = x0_fn(x, jnp.full((x.shape[0],), t, jnp.float32))
    if s > 0:
      x = renoise(x0, s, jax.random.fold_in(key, k))
  return x0


class GanHead(nn.Module):
  """The discriminator head: teacher tokens [B, N, D] -> one logit per example [B] (mean over tokens)."""
  width: int

  @nn.compact
  def __call__(self, tokens_BxNxD: jax.Array) -> jax.Array:
    h = nn.silu(nn.Dense(self.width, name="fc1")(nn.LayerNorm(name="norm")(tokens_BxNxD)))
    return nn.Dense(1, name="fc2")(h)[..., 0].astype(jnp.float32).mean(axis=1)


def distill_losses(model, head: GanHead, params, hr: jax.Array, key: jax.Array, iteration,
                   config: ml_collections.ConfigDict, encoder):
  """The iteration's loss (the student's or the fake score's, by `is_student_step`) and its terms."""
  dc, pc = config.distill, config.pid
  b = hr.shape[0]
  keys = jax.random.split(key, 8)
  lr = pid_task.downsample(hr, int(pc.scale))
  z, sigma = pid_task.corrupt_latent(keys[0], jax.lax.stop_gradient(encoder.encode(lr)),
                                     sigma_max=float(pc.sigma_max), prob=float(pc.corrupt_prob))
  frozen = lambda name: jax.lax.stop_gradient(params[name])
  velocity = lambda p, x, t, keep=None: model.apply({"params": p}, x, t, z, sigma, keep)
  x0_of = lambda p, x, t: x - flow.time_like(t, x) * velocity(p, x, t)
  times = jnp.asarray(STUDENT_SCHEDULE[:-1], jnp.float32)
  k = jax.random.randint(keys[1], (b,), 0, len(times))
  t_k = times[k]

  def student_x0(student_params):
    if dc.student_input == "real":      # teacher forcing: the real image noised to t_k
      x_k = renoise(hr, t_k, keys[2])
    else:                               # backward simulation: the student's own chain down to t_k
      x = jax.random.normal(keys[2], hr.shape, hr.dtype)
      sp = jax.lax.stop_gradient(student_params)
      for j in range(len(times) - 1):
        t_j = jnp.full((b,), times[j])
        nxt = renoise(x0_of(sp, x, t_j), times[j + 1], jax.random.fold_in(keys[3], j))
        x = jnp.where((j < k).reshape(-1, 1, 1, 1), nxt, x)
      x_k = x
    return x0_of(student_params, x_k, t_k)

  def teacher_x0(x, t):
    cond = velocity(frozen("teacher"), x, t)
    uncond = velocity(frozen("teacher"), x, t, jnp.zeros((b,)))
    return x - flow.time_like(t, x) * flow.cfg_mix(cond, uncond, float(dc.teacher_cfg))

  def logits(head_params, x, t):
    tokens = model.apply({"params": frozen("teacher")}, x, t, z, sigma, features_at=int(dc.gan_block))
    return head.apply({"params": head_params}, tokens)

  use_gan = float(dc.gan_weight) > 0
  gan_on = float(dc.gan_weight) * (iteration >= int(dc.gan_warmup)).astype(jnp.float32)

  def student_loss(p):
    x0 = student_x0(p["student"])
    t = perturbation_time(keys[4], b)
    x_t = renoise(x0, t, keys[5])
    real = jax.lax.stop_gradient(teacher_x0(x_t, t))
    fake = jax.lax.stop_gradient(x0_of(frozen("fake"), x_t, t))
    dm = flow.dm_loss(x0, flow.dm_gradient(x0, real, fake))
    if not use_gan:
      return dm, {"dm": dm}
    gan = jnp.mean(jax.nn.softplus(-logits(frozen("head"), x_t, t)))
    return dm + gan_on * gan, {"dm": dm, "gan_g": gan}

  def fake_loss(p):
    x0 = jax.lax.stop_gradient(student_x0(frozen("student")))
    x_t, t, _, eps = flow.flow_matching_batch(keys[6], x0, time_kind="logit_normal",
                                              shift=pid_task.pixel_shift(config, hr.shape[1]))
    fake = flow.flow_matching_loss(velocity(p["fake"], x_t, t), x0, eps)
    if not use_gan:
      return fake, {"fake_flow": fake}
    t_d = perturbation_time(keys[7], b)
    noise = jax.random.normal(jax.random.fold_in(keys[7], 1), hr.shape, hr.dtype)
    real_t, fake_t = flow.interpolate(hr, noise, t_d), flow.interpolate(x0, noise, t_d)
    d_real, d_fake = logits(p["head"], real_t, t_d), logits(p["head"], fake_t, t_d)
    disc = jnp.mean(jax.nn.softplus(d_fake) + jax.nn.softplus(-d_real))
    nudged = real_t + float(dc.r1_sigma) * jax.random.normal(jax.random.fold_in(keys[7], 2), hr.shape)
    r1 = jnp.mean((d_real - logits(p["head"], nudged, t_d)) ** 2)
    return fake + gan_on * (disc + float(dc.r1_weight) * r1), {"fake_flow": fake, "gan_d": disc, "r1": r1}

  names = ("dm", "fake_flow") + (("gan_g", "gan_d", "r1") if use_gan else ())
  zero = {name: jnp.zeros((), jnp.float32) for name in names}

  def branch(fn):     # both branches of the cond return the same terms
    def run(p):
      value, terms = fn(p)
      return value, {**zero, **terms}
    return run

  return jax.lax.cond(is_student_step(iteration), branch(student_loss), branch(fake_loss), params)


def check_config(config: ml_collections.ConfigDict) -> None:
  registry.check_choices(config, {"distill.student_input": STUDENT_INPUTS})
  dc = config.distill
  if not 0 <= int(dc.gan_block) < int(config.model.depth):
    raise ValueError(f"config.distill.gan_block={dc.gan_block}; expected a joint block in "
                     f"[0, {config.model.depth})")
  if config.pid.mode == "pretrain":
    raise ValueError("config.pid.mode='pretrain': DMD2 distils a conditional PiD teacher")
  pid_task.check_config(config.teacher)


def prepare(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Trains the teacher (and what it needs) when missing."""
  path = teacher_path(config, workdir)
  pid_task.prepare(config.teacher, path)
  train.ensure_trained(config.teacher, path, "teacher")


def teacher_path(config: ml_collections.ConfigDict, workdir: str | None) -> str:
  return os.path.normpath(os.path.join(workdir or os.curdir,
                                       os.path.expanduser(config.distill.teacher_workdir)))


@registry.register("pid_distill", check=check_config, prepare=prepare)
def build(config: ml_collections.ConfigDict, workdir: str | None = None) -> train.Task:
  dc, data_c = config.distill, config.data
  path = teacher_path(config, workdir)
  teacher, teacher_config = train.restore_trained(
      path, int(config.teacher.train.num_steps), "teacher",
      f"config.distill.teacher_workdir={dc.teacher_workdir!r}")
  model = pid_task.build_model(teacher_config)
  encoder = pid_task.load_encoder(teacher_config, path)
  head = GanHead(int(teacher_config.model.width))
  size = pid_task.hr_size(config)

  def init_params(key):
    tokens = jnp.zeros((1, (size // int(teacher_config.model.patch_size)) ** 2,
                        int(teacher_config.model.width)))
    return {"student": teacher, "fake": teacher, "teacher": teacher,
            "head": head.init(key, tokens)["params"]}

  def update_groups(params):
    labels = {name: jax.tree.map(lambda _: group, params[name]) for name, group in
              (("student", "student"), ("fake", "critic"), ("head", "critic"), ("teacher", "frozen"))}
    return labels, {"student": is_student_step, "critic": lambda n: ~is_student_step(n),
                    "frozen": None}

  def loss(params, batch, key, carry):
    value, terms = distill_losses(model, head, params, batch["image"], key, carry["iteration"], config,
                                  encoder)
    return value, terms, {"iteration": carry["iteration"] + 1}

  train_data = lambda pi, pc: data.flipped_images(config, data_c, pi, pc)

  eval_hr = data.to_float({"image": data.load_in_memory(data_c.name, data_c.eval_split, config=data_c.config)
                           .arrays["image"][:int(config.eval_size)]}, None)["image"]
  noise = jax.random.normal(jax.random.PRNGKey(4321), eval_hr.shape)
  scale = int(config.pid.scale)

  @jax.jit
  def eval_decode(params):
    latent = encoder.encode(pid_task.downsample(eval_hr, scale))
    x0_fn = lambda x, t: x - flow.time_like(t, x) * model.apply({"params": params["student"]}, x, t, latent)
    return student_sample(x0_fn, noise, jax.random.PRNGKey(99))

  def evaluate(params, step, workdir):
    """PSNR / SSIM of the 4-step student's decodes of the eval crops (sigma_lat 0)."""
    return metrics.image_quality(eval_decode(params), eval_hr)

  def sample(params, step, workdir):
    n = min(8, len(eval_hr))
    picture = writers.image_grid(np.concatenate([np.asarray(eval_decode(params))[:n], eval_hr[:n]]),
                                 ncol=n)
    writers.save_sample(picture, workdir, step)
    return {"grid": picture}

  return train.Task(init_params=init_params, loss=loss, train_data=train_data, evaluate=evaluate,
                    sample=sample, init_carry=lambda key: {"iteration": jnp.zeros((), jnp.int32)},
                    update_groups=update_groups)
