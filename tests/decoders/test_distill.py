"""decoders/distill.py: the DMD2 update on a 1-D Gaussian with exact scores, the normalised gradient,
the perturbation times, the student's re-noising sampler, and the alternation of updates."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core import flow
from decoders import distill


def _posterior_mean(x_t, t, mean, std):
  """E[x0 | x_t] for x0 ~ N(mean, std^2), x_t = (1 - t) x0 + t n: the exact x0-prediction."""
  a, var = 1 - t, std ** 2
  return mean + a * var / (a ** 2 * var + t ** 2) * (x_t - a * mean)


def test_dmd_update_moves_a_gaussian_student_toward_the_teacher(rng, key):
  """Student x0 = theta + 0.5 g (g ~ N(0, 1)); teacher = exact denoiser of N(mu, 0.5^2), fake score =
  exact denoiser of the student's own N(theta, 0.5^2). SGD on the DMD loss drives theta to mu."""
  mu, std = float(rng.uniform(-2, 2)), 0.5
  theta = jnp.float32(mu + rng.choice([-1, 1]) * rng.uniform(1.0, 2.0))
  start = abs(float(theta) - mu)

  def loss(theta, k):
    k_g, k_t, k_n = jax.random.split(k, 3)
    # 64 examples of 32 dimensions each: the normaliser is a per-example mean, as over an image's pixels.
    x0 = theta + std * jax.random.normal(k_g, (64, 32))
    t = distill.perturbation_time(k_t, 64)
    x_t = distill.renoise(x0, t, k_n)
    real = _posterior_mean(x_t, t[:, None], mu, std)
    fake = _posterior_mean(x_t, t[:, None], jax.lax.stop_gradient(theta), std)
    return flow.dm_loss(x0, flow.dm_gradient(x0, real, fake))

  grad = jax.jit(jax.grad(loss))
  first = float(grad(theta, key))
  assert np.sign(first) == np.sign(float(theta) - mu)       # descent points toward mu
  for i in range(300):
    theta = theta - 0.02 * grad(theta, jax.random.fold_in(key, i))    # |grad| ~ 1: normalised
  assert abs(float(theta) - mu) < 0.1 * start


def test_dmd_gradient_is_normalised_and_finite(rng):
  x0 = rng.normal(size=(3, 4, 4, 3)).astype(np.float32)
  real = rng.normal(size=x0.shape).astype(np.float32)
  fake = rng.normal(size=x0.shape).astype(np.float32)
  norm = np.abs(x0 - real).reshape(3, -1).mean(1)[:, None, None, None]
  np.testing.assert_allclose(flow.dm_gradient(jnp.asarray(x0), jnp.asarray(real), jnp.asarray(fake)),
                             (fake - real) / norm, rtol=1e-5, atol=1e-5)
  # x0 == x0_real: a zero normaliser gives 0, not NaN
  same = flow.dm_gradient(jnp.asarray(x0), jnp.asarray(x0), jnp.asarray(fake))
  assert np.all(np.asarray(same) == 0)
  # dL/dx0 = grad / size, up to the rounding of x0 - (x0 - grad) in float32
  g = jnp.asarray((fake - real) / norm)
  rounding = 4 * np.finfo(np.float32).eps * (np.abs(x0) + np.abs(np.asarray(g))) / x0.size
  np.testing.assert_allclose(jax.grad(flow.dm_loss)(jnp.asarray(x0), g), g / x0.size, rtol=1e-5,
                             atol=float(rounding.max()))


def test_perturbation_times_are_clamped_logit_normal(key):
  t = np.asarray(distill.perturbation_time(key, 20000))
  assert t.min() >= 0.02 and t.max() <= 0.99
  logit = np.log(t / (1 - t))
  inner = (t > 0.021) & (t < 0.989)
  assert abs(np.median(logit)) < 0.05 and abs(np.std(logit[inner]) - 1) < 0.1


def test_student_sampler_renoises_along_the_schedule(rng, key):
  """With an exact x0 predictor of a point mass every step returns c; the predictor sees the
  schedule's times, and each input is (1 - t) c + t eps' with fresh noise."""
  c = jnp.asarray(rng.normal(size=(1, 2, 2, 3)), jnp.float32)
  seen = []

  def x0_fn(x, t):
    seen.append((float(t[0]), np.asarray(x)))
    return jnp.broadcast_to(c, x.shape)

  noise = jnp.asarray(rng.normal(size=(2, 2, 2, 3)), jnp.float32)
  out = distill.student_sample(x0_fn, noise, key)
  np.testing.assert_array_equal(out, np.broadcast_to(c, noise.shape))
  assert [t for t, _ in seen] == pytest.approx(list(distill.STUDENT_SCHEDULE[:-1]))
  np.testing.assert_array_equal(seen[0][1], noise)
  for k, (t, x) in enumerate(seen[1:], start=1):
    eps = (x - (1 - t) * np.asarray(c)) / t
    assert abs(eps.std() - 1) < 0.8 and not np.allclose(eps, np.asarray(noise))


def test_the_student_steps_once_every_six_iterations():
  steps = np.asarray([bool(distill.is_student_step(jnp.int32(n))) for n in range(18)])
  assert steps.sum() == 3 and list(np.flatnonzero(steps)) == [5, 11, 17]
