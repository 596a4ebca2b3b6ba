"""kernels.linear_attention: the Pallas kernel (interpret mode on CPU) and the XLA reference against
an independent float64 numpy reference, forward and gradients; jit, vmap, grad and shard_map;
impl="auto" on CPU; bad-input errors.

Inputs come from the `rng` fixture (numpy rather than jax.random: on CPU every new shape would
compile the sampler again), so every run draws new ones; the tolerances hold for every draw:
- The reference is float64 on the same, already rounded, inputs, and the kernels and the XLA
  reference keep every intermediate in float32 (S, z, den; in the backward out, dS, dz), rounding
  to the output dtype once, at the end.
- The denominators cannot amplify that: den_i = relu(q_i) . z is a sum of non-negative terms,
  exact to float32 rounding however small it is, and where it is small next to eps (relu(q_i) ~ 0)
  the output is ~0 in both. What cancels is in the numerators and gradients: out_i is a convex
  combination of the v_j (terms ~|v|, result ~|v| / sqrt(Nk)), dq and dk are differences of two
  terms of similar size, and with one key (Nk = 1) those cancel completely (grad_term_sizes_np).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core import sharding
from kernels.linear_attention import linear_attention

EPS = 1e-6
# Relative error ||actual - expected|| / ||expected|| allowed per dtype.
# float32: sums over n <= 1024 tokens round like sqrt(n) 2^-24 of their terms, which the
#   cancellation above makes up to ~sqrt(Nk) times the result: measured <= 1e-6 (0.05 TOL) over
#   300 draws of every case (the norm over >= 192 outputs averages the rounding errors, so the
#   error hardly varies between draws).
# bfloat16: the one final rounding is <= 2^-8 of each element, hence of the norm, so the error is
#   <= 2^-8 + (1 + 2^-8) (the float32 error) < 2^-8 + 2e-5; 2^-7 is twice that (measured 0.43 2^-8).
TOL = {"float32": 2e-5, "bfloat16": 2 ** -7}
B, H = 2, 3


def _inputs(rng, n, d, dtype, *, nk=None, b=B, h=H):
  """q [b, n, h, d]; k, v [b, nk, h, d]; a cotangent g like q; all rounded to `dtype`."""
  nk = n if nk is None else nk
  shapes = ((b, n, h, d), (b, nk, h, d), (b, nk, h, d), (b, n, h, d))
  return tuple(jnp.asarray(rng.standard_normal(s, np.float32).astype(dtype)) for s in shapes)


def _f64(a):
  """float64 numpy copy (jax arrays, bfloat16 included, go through float32 exactly)."""
  if isinstance(a, jax.Array):
    a = a.astype(jnp.float32)
  return np.asarray(a, np.float64)


def linear_attention_np(q, k, v, eps=EPS):
  """float64 reference: out_i = relu(q_i) S / (relu(q_i) . z + eps), S = sum_j relu(k_j)^T v_j,
  z = sum_j relu(k_j), per (batch, head)."""
  q, k, v = map(_f64, (q, k, v))
  a, c = np.maximum(q, 0), np.maximum(k, 0)
  s = np.einsum("bjhd,bjhe->bhde", c, v)
  z = c.sum(1)
  den = np.einsum("bihd,bhd->bih", a, z) + eps
  return np.einsum("bihd,bhde->bihe", a, s) / den[..., None]


def linear_attention_vjp_np(q, k, v, g, eps=EPS):
  """float64 (dq, dk, dv) of sum(g * out), by hand (checked against finite differences below)."""
  q, k, v, g = map(_f64, (q, k, v, g))
  a, c = np.maximum(q, 0), np.maximum(k, 0)
  s = np.einsum("bjhd,bjhe->bhde", c, v)
  z = c.sum(1)
  den = np.einsum("bihd,bhd->bih", a, z) + eps
  out = np.einsum("bihd,bhde->bihe", a, s) / den[..., None]
  g_num = g / den[..., None]                    # cotangent of the numerator relu(q) S
  g_den = -np.sum(g * out, -1) / den            # cotangent of the denominator [B, N, H]
  da = np.einsum("bhde,bihe->bihd", s, g_num) + g_den[..., None] * z[:, None]
  ds = np.einsum("bihd,bihe->bhde", a, g_num)
  dz = np.einsum("bihd,bih->bhd", a, g_den)
  dc = np.einsum("bhde,bjhe->bjhd", ds, v) + dz[:, None]
  dv = np.einsum("bjhd,bhde->bjhe", c, ds)
  return da * (q > 0), dc * (k > 0), dv


def grad_term_sizes_np(q, k, v, g, eps=EPS):
  """Sizes of the first of the two terms of dq = relu'(q) (S g - z (g . out)) / den and of
  dk = relu'(k) (dS v + dz).

  The terms cancel where out hardly depends on q and k (Nk = 1: out = v (a . c) / (a . c + eps)),
  so there the rounding error of dq and dk is relative to these sizes rather than to |dq|, |dk|.
  """
  q, k, v, g = map(_f64, (q, k, v, g))
  a, c = np.maximum(q, 0), np.maximum(k, 0)
  s = np.einsum("bjhd,bjhe->bhde", c, v)
  g_num = g / (np.einsum("bihd,bhd->bih", a, c.sum(1)) + eps)[..., None]
  ds = np.einsum("bihd,bihe->bhde", a, g_num)
  return (np.linalg.norm(np.einsum("bhde,bihe->bihd", s, g_num) * (q > 0)),
          np.linalg.norm(np.einsum("bhde,bjhe->bjhd", ds, v) * (k > 0)))


def _assert_close(name, actual, expected, tol, scale=0.0):
  """Relative error in the 2-norm (relative to max(|expected|, scale)), computed in float64."""
  actual = _f64(actual)
  assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
  assert np.all(np.isfinite(actual)), f"{name}: non-finite values"
  err = np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), scale)
  assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.3g}"


def _check_grads(grads, q, k, v, g, tol, where=""):
  """dq, dk, dv (dtype and values) against the float64 reference; with a single key row dq and dk
  are measured against the size of their cancelling terms (see grad_term_sizes_np)."""
  scales = (*grad_term_sizes_np(q, k, v, g), 0.0) if k.shape[1] == 1 else (0.0, 0.0, 0.0)
  want = linear_attention_vjp_np(q, k, v, g)
  for name, arg, got, ref, sc in zip("qkv", (q, k, v), grads, want, scales):
    assert got.dtype == arg.dtype, f"d{name}{where}: dtype {got.dtype} != {arg.dtype}"
    _assert_close(f"d{name}{where}", got, ref, tol, sc)


@functools.cache
def _fn(impl):
  """The function under test; cached, so that jit finds its compiled programs again (under --seeds
  each test runs with several draws of the same shapes)."""
  if impl == "pallas":
    return functools.partial(linear_attention, impl="pallas", interpret=True)
  return functools.partial(linear_attention, impl=impl)


@functools.partial(jax.jit, static_argnums=0)
def _value_and_grads(fn, q, k, v, g):
  """(out, (dq, dk, dv)) from jax.vjp with cotangent g, as one compiled program (op-by-op
  dispatch compiles every primitive separately, which dominates on CPU)."""
  out, vjp = jax.vjp(fn, q, k, v)
  return out, vjp(g)


def test_reference_gradients_match_finite_differences(rng):
  """The hand-written float64 gradients equal central differences of the float64 forward."""
  q, k, v = (rng.normal(size=s) for s in ((2, 3, 2, 4), (2, 5, 2, 4), (2, 5, 2, 4)))
  # Away from the relu kink (|q|, |k| >= 0.1 >> h), which also bounds the conditioning: out is
  # linear-fractional in each q_id (or k_jd), and den_i >= 0.1 times that entry's coefficient in it,
  # so the central differences are exact to (10 h)^2 relative, for every draw.
  q, k = (np.sign(a) * (np.abs(a) + 0.1) for a in (q, k))
  q[0, 1, 0] = -np.abs(q[0, 1, 0])                           # one all-zero relu(q) row
  g = rng.normal(size=q.shape)
  grads = linear_attention_vjp_np(q, k, v, g)
  h = 1e-6
  for i, x in enumerate((q, k, v)):
    fd = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
      args_p, args_m = [q.copy(), k.copy(), v.copy()], [q.copy(), k.copy(), v.copy()]
      args_p[i][idx] += h
      args_m[i][idx] -= h
      fd[idx] = np.sum(g * (linear_attention_np(*args_p) - linear_attention_np(*args_m))) / (2 * h)
    np.testing.assert_allclose(grads[i], fd, rtol=1e-6, atol=1e-6)


# (N, Nk, D, dtype) of the gradient tests: k and v may be as long as q, longer or shorter, down to
# one token. The forward tests take the other half of {1, 200, 257, 1024} x {32, 64} x {float32,
# bfloat16}, so that every combination is checked once (interpret mode compiles per shape: the
# whole cross product twice would be slow on CPU).
_GRAD_CASES = [
    (1, 1, 64, "bfloat16"),
    (1, 1024, 32, "float32"),
    (200, 257, 32, "float32"),
    (200, 200, 64, "bfloat16"),
    (257, 257, 64, "float32"),
    (257, 1, 32, "bfloat16"),
    (1024, 1024, 64, "float32"),
    (1024, 200, 32, "bfloat16"),
]
_FORWARD_CASES = [(n, d, dtype) for n in (1, 200, 257, 1024) for d in (32, 64)
                  for dtype in ("float32", "bfloat16")
                  if (n, d, dtype) not in [(c[0], c[2], c[3]) for c in _GRAD_CASES]]


@pytest.mark.parametrize("n, d, dtype", _FORWARD_CASES)
@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_forward_matches_reference(rng, impl, n, d, dtype):
  """Output (shape, dtype, values) equals the float64 reference (the N, D, dtype combinations
  that the gradient tests below do not cover)."""
  q, k, v, _ = _inputs(rng, n, d, jnp.dtype(dtype))
  out = jax.jit(_fn(impl))(q, k, v)
  assert out.shape == (B, n, H, d) and out.dtype == jnp.dtype(dtype)
  _assert_close("out", out, linear_attention_np(q, k, v), TOL[dtype])


# The kernel takes every gradient case; the XLA reference (plain JAX) half of them.
_GRAD_PARAMS = ([("pallas", *c) for c in _GRAD_CASES]
                + [("xla", *_GRAD_CASES[i]) for i in (0, 2, 4, 7)])


@pytest.mark.parametrize("impl, n, nk, d, dtype", _GRAD_PARAMS)
def test_gradients_match_reference(rng, impl, n, nk, d, dtype):
  """jax.vjp with a random cotangent: the output and dq, dk, dv (dtypes and values) all equal the
  float64 reference, for Nk equal to, longer or shorter than N."""
  q, k, v, g = _inputs(rng, n, d, jnp.dtype(dtype), nk=nk)
  out, grads = _value_and_grads(_fn(impl), q, k, v, g)
  assert out.shape == (B, n, H, d) and out.dtype == jnp.dtype(dtype)
  _assert_close("out", out, linear_attention_np(q, k, v), TOL[dtype])
  _check_grads(grads, q, k, v, g, TOL[dtype])


@pytest.mark.parametrize("impl, dtype", [("pallas", "float32"), ("pallas", "bfloat16"),
                                         ("xla", "float32")])
def test_all_negative_query_rows_stay_finite(rng, impl, dtype):
  """Rows with relu(q) = 0 give exactly 0 output, zero dq, and finite gradients everywhere."""
  n, d = 257, 32
  q, k, v, g = _inputs(rng, n, d, jnp.dtype(dtype))
  rows = np.array([0, 1, 128, 256])
  q = np.array(q)
  q[:, rows] = -np.abs(q[:, rows]) - 0.5
  q[1, 7, 2] = -1.0  # a single (batch, row, head) as well
  q = jnp.asarray(q)
  out, grads = _value_and_grads(_fn(impl), q, k, v, g)
  np.testing.assert_array_equal(_f64(out)[:, rows], 0.0)
  np.testing.assert_array_equal(_f64(out)[1, 7, 2], 0.0)
  _assert_close("out", out, linear_attention_np(q, k, v), TOL[dtype])
  np.testing.assert_array_equal(_f64(grads[0])[:, rows], 0.0)
  _check_grads(grads, q, k, v, g, TOL[dtype])


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_eps_is_added_to_the_denominator(rng, impl):
  """A large eps (about the size of relu(q) . z here) changes the output as the reference says."""
  q, k, v, _ = _inputs(rng, 200, 32, jnp.float32)
  eps = 500.0
  ref = linear_attention_np(q, k, v, eps=eps)
  # Row i moves by eps / (relu(q_i) . z) of its size, relu(q_i) . z ~ 12.8 * 80 ~ 1e3 (sd ~0.3e3):
  # a relative change under 0.1 would need relu(q_i) . z > 5e3 in nearly all 1200 rows.
  assert np.linalg.norm(ref - linear_attention_np(q, k, v)) > 0.1 * np.linalg.norm(ref)
  out = jax.jit(functools.partial(_fn(impl), eps=eps))(q, k, v)
  _assert_close("out", out, ref, TOL["float32"])


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_jit_matches_eager_and_reference(rng, impl):
  """Under jax.jit the result equals the eager call and the reference. The eager call leaves
  interpret=None, which must interpret the kernel off-GPU."""
  q, k, v, _ = _inputs(rng, 257, 64, jnp.float32)
  out = jax.jit(_fn(impl))(q, k, v)
  _assert_close("jit out", out, _f64(linear_attention(q, k, v, impl=impl)), 1e-6)
  _assert_close("jit out", out, linear_attention_np(q, k, v), TOL["float32"])


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_vmap_over_an_extra_axis(rng, impl):
  """vmap over a leading axis equals applying the function to each slice (and the reference)."""
  n, d, vb = 200, 32, 3
  q, k, v, g = _inputs(rng, n, d, jnp.float32, b=vb * B)
  q, k, v, g = (jnp.asarray(np.asarray(a).reshape(vb, B, *a.shape[1:])) for a in (q, k, v, g))
  out, grads = _value_and_grads(jax.vmap(_fn(impl)), q, k, v, g)
  assert out.shape == q.shape
  for i in range(vb):
    _assert_close(f"slice {i}", out[i], linear_attention_np(q[i], k[i], v[i]), TOL["float32"])
  for i in range(vb):
    _check_grads([a[i] for a in grads], q[i], k[i], v[i], g[i], TOL["float32"], f" slice {i}")


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_jit_grad(rng, impl):
  """jax.jit(jax.grad) of sum(g * out) with respect to q, k and v equals the reference."""
  q, k, v, g = _inputs(rng, 200, 64, jnp.float32)
  loss = lambda q, k, v: jnp.sum(_fn(impl)(q, k, v) * g)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  _check_grads(grads, q, k, v, g, TOL["float32"])


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_shard_map_matches_unsharded(rng, impl):
  """Batch over "data", heads over "model" on 8 fake devices: output and grads equal unsharded."""
  mesh = sharding.make_mesh({"data": 4, "fsdp": 1, "model": 2})
  q, k, v, g = _inputs(rng, 257, 32, jnp.float32, b=4, h=4)
  dims = ("batch", None, "heads", None)
  sharded = lambda q, k, v: sharding.shard_kernel(_fn(impl), (q, k, v), (dims,) * 3, dims)
  with jax.set_mesh(mesh):
    out, grads = _value_and_grads(sharded, q, k, v, g)
  want_out, want_grads = _value_and_grads(_fn(impl), q, k, v, g)
  _assert_close("sharded out", out, _f64(want_out), 1e-6)
  _assert_close("sharded out", out, linear_attention_np(q, k, v), TOL["float32"])
  for name, a, b in zip("qkv", grads, want_grads):
    _assert_close(f"sharded d{name}", a, _f64(b), 1e-6)


def test_auto_on_cpu_takes_the_reference(rng):
  """impl="auto" off-GPU: no pallas_call in its jaxpr (forward or grad), same values as "xla"."""
  if jax.default_backend() == "gpu":
    pytest.skip("on a GPU 'auto' may take the kernel")
  q, k, v, g = _inputs(rng, 200, 32, jnp.float32)
  jaxpr = lambda impl: str(jax.make_jaxpr(lambda q, k, v: linear_attention(q, k, v, impl=impl))(
      q, k, v))
  grad_jaxpr = lambda impl: str(jax.make_jaxpr(jax.grad(
      lambda q, k, v: jnp.sum(linear_attention(q, k, v, impl=impl) * g), argnums=(0, 1, 2)))(
          q, k, v))
  assert "pallas_call" not in jaxpr("auto")
  assert "pallas_call" not in grad_jaxpr("auto")
  assert "pallas_call" in jaxpr("pallas")
  assert "pallas_call" in grad_jaxpr("pallas")
  np.testing.assert_array_equal(linear_attention(q, k, v, impl="auto"),
                                linear_attention(q, k, v, impl="xla"))
  np.testing.assert_array_equal(linear_attention(q, k, v), linear_attention(q, k, v, impl="xla"))


# (q, k, v) shapes with one bad argument, and (a regex of) the argument the message must name.
_BAD_SHAPES = [
    (((2, 8, 3), (2, 8, 3, 4), (2, 8, 3, 4)), "q"),           # rank 3
    (((2, 8, 3, 4, 1), (2, 8, 3, 4), (2, 8, 3, 4)), "q"),     # rank 5
    (((2, 8, 3, 4), (2, 8, 3), (2, 8, 3, 4)), "k"),           # rank 3
    (((2, 8, 3, 4), (2, 8, 3, 4), (2, 8, 3)), "v"),           # rank 3
    (((2, 8, 3, 4), (2, 8, 3, 5), (2, 8, 3, 4)), "k"),        # head dim differs from q's
    (((2, 8, 3, 4), (1, 8, 3, 4), (1, 8, 3, 4)), "[kv]"),     # batch differs from q's
    (((2, 8, 3, 4), (2, 8, 2, 4), (2, 8, 2, 4)), "[kv]"),     # heads differ from q's
    (((2, 8, 3, 4), (2, 8, 3, 4), (2, 6, 3, 4)), "v"),        # length differs from k's
    (((2, 8, 3, 4), (2, 8, 3, 4), (1, 8, 3, 4)), "v"),        # batch differs from k's
]


@pytest.mark.parametrize("shapes, arg", _BAD_SHAPES)
@pytest.mark.parametrize("impl", ["pallas", "xla", "auto"])
def test_bad_shapes_name_the_argument(impl, shapes, arg):
  """Wrong rank or mismatched shapes: a ValueError naming the argument and a shape."""
  q, k, v = (jnp.zeros(s, jnp.float32) for s in shapes)
  with pytest.raises(ValueError, match=rf"\b{arg}\b") as info:
    linear_attention(q, k, v, impl=impl, interpret=True)
  assert any(c in str(info.value) for c in ("[", "(")), f"no shape in: {info.value}"


@pytest.mark.parametrize("arg", [0, 1, 2])
@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_integer_dtype_is_rejected(impl, arg):
  """An integer q, k or v: a TypeError (or ValueError) naming it."""
  args = [jnp.zeros((2, 8, 3, 4), jnp.float32) for _ in range(3)]
  args[arg] = args[arg].astype(jnp.int32)
  with pytest.raises((TypeError, ValueError), match=rf"\b{'qkv'[arg]}\b"):
    linear_attention(*args, impl=impl, interpret=True)


def test_unknown_impl_is_rejected():
  """impl must be one of "xla", "pallas", "auto"."""
  q = jnp.zeros((2, 8, 3, 4), jnp.float32)
  with pytest.raises(ValueError, match="impl"):
    linear_attention(q, q, q, impl="flash")


def test_block_sizes_are_a_validated_argument(rng):
  """Another tiling gives the same result; a bad one is refused naming the field."""
  from kernels.common import BlockSizes
  q, k, v, _ = _inputs(rng, 100, 16, jnp.float32)
  small = linear_attention(q, k, v, impl="pallas", block_sizes=BlockSizes(rows=16, num_warps=2))
  np.testing.assert_allclose(small, linear_attention(q, k, v, impl="pallas"), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match=r"BlockSizes.rows=48; expected a power of two in \[16, 1024\]"):
    BlockSizes(rows=48)
  with pytest.raises(ValueError, match="BlockSizes.num_warps=3"):
    BlockSizes(rows=64, num_warps=3)
  with pytest.raises(TypeError, match="block_sizes must be a kernels.common.BlockSizes"):
    linear_attention(q, k, v, block_sizes={"rows": 64})
  import dataclasses
  with pytest.raises(dataclasses.FrozenInstanceError):
    BlockSizes(rows=64).rows = 32
