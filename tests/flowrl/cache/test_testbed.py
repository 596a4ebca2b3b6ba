"""The analytic testbed (flowrl/cache/testbed.py): its velocity against the score of the smoothed
density in float64, Euler transport to the data's moments, and every policy on it against the float64
reference loop (tests/flowrl/cache/reference.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core import flow
from flowrl.cache import sampling, testbed, vde
from tests.flowrl.cache.reference import TIE_MARGIN, reference

N, D, C = 6, 4, 3          # components, dimensions, classes


def _draw(rng, smoothing=None):
  """(means [N, D], smoothing, labels [N] covering the C classes)."""
  s = float(rng.uniform(0.1, 0.5)) if smoothing is None else smoothing
  return 1.5 * rng.normal(size=(N, D)), s, rng.permutation(np.arange(N) % C)


def _log_density(means, s, labels, x, t, y=None):
  """log p_t(x) [B] in float64: x_t = (1 - t) x0 + t eps, x0 ~ the mixture (of class y's components)."""
  mu = means if y is None else means[labels == y]
  var = (1 - t) ** 2 * s ** 2 + t ** 2
  d2 = np.sum((x[:, None] - (1 - t) * mu[None]) ** 2, -1)
  log_k = -d2 / (2 * var) - x.shape[1] / 2 * np.log(2 * np.pi * var)
  top = log_k.max(1, keepdims=True)
  return (top[:, 0] + np.log(np.mean(np.exp(log_k - top), axis=1)))


def _velocity_from_score(means, s, labels, x, t, y=None, h=1e-5):
  """v = (E[eps | x_t] - x_t) / (1 - t) with E[eps | x_t] = -t grad log p_t (Tweedie), the gradient by
  central differences in float64."""
  grad = np.zeros_like(x)
  for d in range(x.shape[1]):
    step = np.zeros_like(x)
    step[:, d] = h
    grad[:, d] = (_log_density(means, s, labels, x + step, t, y)
                  - _log_density(means, s, labels, x - step, t, y)) / (2 * h)
  return (-t * grad - x) / (1 - t)


def _covariance_error(x, cov):
  """|sample covariance of x [n, D] - cov| and its standard error from the samples (the spread of
  the centred products x_i x_j), both [D, D]."""
  centred = x - x.mean(0)
  products = centred[:, :, None] * centred[:, None, :]
  return np.abs(np.cov(x.T) - cov), products.std(0) / np.sqrt(len(x))


def _np_velocity(means, s, labels, x, t_B, y=None):
  """The closed form through each component's posterior means of x0 and eps, float64 [B, D]."""
  t = t_B[:, None, None]
  var = (1 - t) ** 2 * s ** 2 + t ** 2
  diff = x[:, None] - (1 - t) * means[None]                       # [B, N, D]
  logits = -np.sum(diff ** 2, -1) / (2 * var[:, :, 0])
  if y is not None:
    logits = np.where(labels[None] == y[:, None], logits, -np.inf)
  w = np.exp(logits - logits.max(1, keepdims=True))
  w /= w.sum(1, keepdims=True)
  e_x0 = means[None] + (1 - t) * s ** 2 / var * diff
  e_eps = t / var * diff
  return np.einsum("bn,bnd->bd", w, e_eps - e_x0)


def test_velocity_is_the_flow_of_the_smoothed_density(rng):
  """Conditional (class y) and unconditional (the null label C) velocities against the score of p_t
  in float64, at a time inside (0, 1) and at the ends: v(x, 1) = x - E[x0], v(x, 0) = -x."""
  means, s, labels = _draw(rng)
  bed = testbed.mixture(means, s, labels)
  x = rng.normal(size=(5, D)) * 1.5
  t = float(rng.uniform(0.05, 0.95))
  y = rng.integers(0, C, size=5)
  velocity = jax.jit(testbed.velocity)     # one program: the same shapes throughout
  jax_v = lambda t, y: np.asarray(velocity(bed, jnp.asarray(x, jnp.float32), jnp.full(5, t, jnp.float32),
                                           jnp.asarray(y, jnp.int32)), np.float64)
  tol = dict(rtol=1e-4, atol=1e-4 * np.abs(x).max())
  conditional = np.concatenate([_velocity_from_score(means, s, labels, x[b:b + 1], t, y[b])
                                for b in range(5)])
  np.testing.assert_allclose(jax_v(t, y), conditional, **tol)
  np.testing.assert_allclose(_np_velocity(means, s, labels, x, np.full(5, t), y), conditional, **tol)
  unconditional = _velocity_from_score(means, s, labels, x, t)
  np.testing.assert_allclose(jax_v(t, np.full(5, C)), unconditional, **tol)
  np.testing.assert_allclose(_np_velocity(means, s, labels, x, np.full(5, t)), unconditional, **tol)
  np.testing.assert_allclose(jax_v(1.0, np.full(5, C)), x - means.mean(0), **tol)
  np.testing.assert_allclose(jax_v(0.0, y), -x, **tol)


@pytest.mark.parametrize("conditional", [False, True])
def test_euler_transports_noise_to_the_data_moments(rng, conditional):
  """500 Euler steps from 20000 noise samples land on the data's mean and covariance (of one class
  with a label and cfg_scale 1). Tolerances: 5 standard errors of the sample moments plus 0.02 of
  the data's scale (squared for the covariance) for the discretisation: with 400000 samples its
  error measured at most 0.004 (mean) and 0.011 (covariance) over 6 draws; 0.024 at 200 steps."""
  means, s, labels = _draw(rng, smoothing=0.3)
  bed = testbed.mixture(means, s, labels)
  n, y = 20000, int(rng.integers(0, C))
  net = testbed.network(bed, y=jnp.full(n, y, jnp.int32) if conditional else None)
  x_T = jax.random.normal(jax.random.key(int(rng.integers(2 ** 31))), (n, D))
  x0, nfe = jax.jit(lambda x: sampling.sample_network(net, x, 500, sampling.full()))(x_T)
  assert float(nfe) == 500
  x0 = np.asarray(x0, np.float64)
  mean, cov = testbed.moments(bed, y if conditional else None)
  scale = np.sqrt(np.trace(cov) / D)
  sd = np.sqrt(np.diag(cov))
  np.testing.assert_array_less(np.abs(x0.mean(0) - mean), 5 * sd / np.sqrt(n) + 0.02 * scale)
  error, se = _covariance_error(x0, cov)
  np.testing.assert_array_less(error, 5 * se + 0.02 * scale ** 2)


STEPS, B = 20, 3

# name: (policy, the reference's kind and settings, full steps of a static schedule or None)
POLICIES = {
    "full": (sampling.full(), "full", {}, STEPS),
    "fewer_steps": (sampling.fewer_steps(7), "full", {}, 7),
    "vde": (sampling.vde(3, 4), "vde", dict(stable_step=3, interval=4),
            len(vde.full_step_indices(STEPS, 3, 4))),
    "vde_reorthogonal": (sampling.vde(3, 4, reorthogonalize=True), "vde",
                         dict(stable_step=3, interval=4, reorthogonalize=True),
                         len(vde.full_step_indices(STEPS, 3, 4))),
    "fora": (sampling.fora(3), "fora", dict(n=3), len(range(0, STEPS, 3))),
    "vde_adaptive": (sampling.vde_adaptive(0.3, 3), "vde_adaptive", dict(stable_step=3, tolerance=0.3),
                     None),
    "vde_residual": (sampling.vde_residual(0.1, 3, 2), "vde_residual",
                     dict(stable_step=3, interval=2, tolerance=0.1), None),
    "vde_budget": (sampling.vde_budget(9, 0.1, 3), "vde_budget",
                   dict(stable_step=3, budget=9, tolerance=0.1), None),
    "teacache": (sampling.teacache(0.15), "teacache", dict(threshold=0.15, coefficients=(1.0, 0.0)),
                 None),
    "easycache": (sampling.easycache(0.3, warmup=3), "easycache", dict(tau=0.3, warmup=3), None),
}
# The fewest evaluations a dynamic policy makes: its forced steps.
FORCED = {"vde_adaptive": 5, "vde_residual": 5, "vde_budget": 5, "teacache": 2, "easycache": 4}


@pytest.mark.parametrize("name", POLICIES)
def test_every_policy_on_the_guided_testbed_matches_the_reference(rng, name):
  """Exact CFG on the testbed (K = 2): each policy's NFE (and its count of real network calls) and
  samples against the float64 loop, the NFE against the policy's schedule."""
  policy, kind, kw, static_nfe = POLICIES[name]
  steps = static_nfe if name == "fewer_steps" else STEPS
  grid = np.asarray(flow.time_grid(steps), np.float64)
  for _ in range(50):                                    # redraw near-ties (reference.TIE_MARGIN)
    means, s, labels = _draw(rng)
    y, scale = rng.integers(0, C, size=B), float(rng.uniform(1.5, 4))
    x_T = rng.normal(size=(B, D))
    np_fn = lambda x, t: np.stack([_np_velocity(means, s, labels, x, t, y),
                                   _np_velocity(means, s, labels, x, t)])
    margins = []
    ref, ref_nfe = reference(np_fn, x_T, grid, kind, lambda v: scale * v[0] + (1 - scale) * v[1],
                             margins=margins, **kw)
    if min(margins, default=np.inf) >= TIE_MARGIN:
      break
  else:
    raise AssertionError(f"no draw without a near-tie in 50 tries ({name})")
  bed = testbed.mixture(means, s, labels)
  net = testbed.network(bed, y=jnp.asarray(y, jnp.int32), cfg_scale=scale)
  calls = []

  def blocks(h, c):
    jax.debug.callback(lambda h: calls.append(1), h)
    return net.blocks(h, c)

  counted = net._replace(blocks=blocks)
  x0, nfe = jax.jit(lambda x: sampling.sample_network(counted, x, STEPS, policy))(
      jnp.asarray(x_T, jnp.float32))
  assert float(nfe) == ref_nfe == len(calls)
  if static_nfe is not None:
    assert ref_nfe == static_nfe
  else:
    assert FORCED[name] <= ref_nfe <= STEPS
    if name == "vde_budget":
      assert ref_nfe <= kw["budget"]
  np.testing.assert_allclose(x0, ref, rtol=1e-4, atol=1e-4)


def test_network_branches_are_the_conditional_and_unconditional_velocities(rng):
  means, s, labels = _draw(rng)
  bed = testbed.mixture(means, s, labels)
  x = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
  t = jnp.asarray(rng.uniform(size=B), jnp.float32)
  y = jnp.asarray(rng.integers(0, C, size=B), jnp.int32)
  v_K = sampling.network_velocity(testbed.network(bed, y=y, cfg_scale=2.5), x, t)
  assert v_K.shape == (2, B, D)
  np.testing.assert_allclose(v_K[0], testbed.velocity(bed, x, t, y), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(v_K[1], testbed.velocity(bed, x, t), rtol=1e-6, atol=1e-6)
  assert sampling.network_velocity(testbed.network(bed, y=y), x, t).shape == (1, B, D)


def test_moments_of_the_mixture(rng):
  means, s, labels = _draw(rng)
  bed = testbed.mixture(means, s, labels)
  # Draws from the mixture: a component each, then Gaussian noise of scale s.
  n = 200000
  x0 = means[rng.integers(0, N, size=n)] + s * rng.normal(size=(n, D))
  mean, cov = testbed.moments(bed)
  sd = np.sqrt(np.diag(cov))
  np.testing.assert_array_less(np.abs(x0.mean(0) - mean), 5 * sd / np.sqrt(n))
  error, se = _covariance_error(x0, cov)
  np.testing.assert_array_less(error, 5 * se)
  mean_y, _ = testbed.moments(bed, 1)
  np.testing.assert_allclose(mean_y, means[labels == 1].mean(0), rtol=1e-6, atol=1e-6)   # float32 means


@pytest.mark.parametrize("make,match", [
    (lambda: testbed.mixture(np.zeros(3), 0.1), r"means must be \[N, \.\.\.\]"),
    (lambda: testbed.mixture(np.zeros((3, 2)), 0.0), "smoothing must be a float > 0"),
    (lambda: testbed.mixture(np.zeros((3, 2)), 0.1, labels=[0, 1]), r"labels must be int classes \[N\]"),
    (lambda: testbed.mixture(np.zeros((3, 2)), 0.1, labels=[0, 2, 2]), "labels must cover the classes"),
    (lambda: testbed.network(testbed.mixture(np.zeros((3, 2)), 0.1), cfg_scale=2.0), "y .* required"),
    (lambda: testbed.network(testbed.mixture(np.zeros((3, 2)), 0.1), y=jnp.zeros(2, jnp.int32)),
     "no labels"),
    (lambda: testbed.velocity(testbed.mixture(np.zeros((3, 2)), 0.1), jnp.zeros((2, 3)), jnp.zeros(2)),
     r"x must be \[B, 2\]")])
def test_testbed_rejects_bad_input(make, match):
  with pytest.raises(ValueError, match=match):
    make()
