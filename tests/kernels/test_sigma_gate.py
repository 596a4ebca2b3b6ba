"""kernels.sigma_gate: the Pallas kernel (interpret mode on CPU) and the XLA reference against an
independent float64 numpy reference, forward and gradients in all six inputs, per-channel (G = D)
and per-token (G = 1) gates; jit, vmap, grad and shard_map; impl="auto" on CPU; bad-input errors.

Inputs come from the `rng` fixture (numpy rather than jax.random: on CPU every new shape would
compile the sampler again), so every run draws new ones; `_inputs` constructs them so that the
tolerances hold for every draw (the reference is float64 on the same, already rounded, inputs):
- Where the kernels or the XLA reference round an input (w to x's dtype; exp(log_alpha) * sigma in
  the parameters' dtype), the draw lies on that grid, so the rounding is exact.
- The gradients in sigma, b and log_alpha sum the gate's cotangent da over tokens (and channels). A
  sum of terms of both signs can cancel far below its terms, whose rounding errors it keeps: these
  three are compared relative to sum |terms| (`reduction_sizes_np`), and the cotangent leans on lq
  so that da is positive on the whole and that size stays within a few times the sum's.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core import sharding
from kernels.sigma_gate import sigma_gate

# Relative error ||actual - expected|| / max(||expected||, scale) allowed per dtype of x.
# float32: the logits sum 2D <= 128 products and the gradients up to 2048 tokens, with rounding
#   ~sqrt(n) 2^-24 of their terms: measured <= 1e-6 (0.05 TOL) over 10^3 draws of every case.
# bfloat16: an output passes through at most four bfloat16 roundings of <= 2^-8 each (a stored
#   intermediate such as da or g s, a bfloat16 sum of two cotangents or product with alpha, the
#   final cast), every other step is float32: <= 4 2^-8 = 1.6e-2 of the size of the terms
#   (measured <= 0.45 TOL over 10^3 draws, on dlog_alpha: a scalar, through all four).
TOL = {"float32": 2e-5, "bfloat16": 2e-2}
B = 2
ARGS = ("x", "lq", "sigma", "w", "b", "log_alpha")


def _inputs(rng, n, d, g, dtype, *, b=B, param_dtype=jnp.float32):
  """(x, lq, sigma, w, b, log_alpha) at realistic scales and a cotangent like x. x, lq and the
  cotangent are `dtype`; the parameters `param_dtype`.

  The logits are ~N(2 - alpha sigma, 0.15^2 2D): the sigmoid saturates in places, not on the
  whole. w lies on `dtype`'s grid, as the kernels and the XLA reference cast it to x's dtype (a
  bfloat16 cast would move a logit by up to 2^-8 sum |x w|, several 1e-2 for some draws, a relative
  error of the gate's terms that no output rounding bounds). With bfloat16 parameters, log_alpha =
  bf16(log 5) (exp(log_alpha) rounds to 5 within 1e-4) and sigma is in {1, ..., 25} / 32, which
  makes the XLA reference's bfloat16 product exp(log_alpha) * sigma exact (it would move logits by
  up to 2^-7 alpha sigma = 3e-2). The cotangent is ct0 + lq (ct0 standard normal): g . lq, summed
  over channels (G = 1) or not, is positive on average, so the sums of da over tokens do not cancel:
  they stay within ~3x of their sum |terms|, the scale they are compared at (measured over 3000
  draws at N = 1, their worst case; ~1.2x at N = 200).
  """
  normal = lambda *s: rng.standard_normal(s)
  cast = lambda a, dt: jnp.asarray(np.asarray(a, np.float32).astype(dt))
  x, lq = normal(b, n, d), normal(b, n, d)
  w = cast(cast(0.15 * normal(2 * d, g), dtype), param_dtype)
  if jnp.dtype(param_dtype) == jnp.float32:
    sigma, log_alpha = rng.uniform(0.0, 0.8, b), np.log(5.0) + 0.1 * normal()
  else:
    sigma, log_alpha = rng.integers(1, 26, b) / 32, np.log(5.0)
  args = (cast(x, dtype), cast(lq, dtype), cast(sigma, param_dtype), w,
          cast(2.0 + 0.3 * normal(g), param_dtype), cast(log_alpha, param_dtype))
  return args, cast(normal(b, n, d) + lq, dtype)


def _f64(a):
  """float64 numpy copy (jax arrays, bfloat16 included, go through float32 exactly)."""
  if isinstance(a, jax.Array):
    a = a.astype(jnp.float32)
  return np.asarray(a, np.float64)


def _gate_pre_np(x, lq, sigma, w, b, log_alpha):
  """float64 pre-activation concat(x, lq) @ w + b - exp(log_alpha) * sigma, [B, N, G]."""
  return np.concatenate([x, lq], -1) @ w + b - np.exp(log_alpha) * sigma[:, None, None]


def sigma_gate_np(x, lq, sigma, w, b, log_alpha):
  """float64 reference: x + sigmoid(concat(x, lq) @ w + b - exp(log_alpha) sigma) * lq."""
  x, lq, sigma, w, b, log_alpha = map(_f64, (x, lq, sigma, w, b, log_alpha))
  s = 1.0 / (1.0 + np.exp(-_gate_pre_np(x, lq, sigma, w, b, log_alpha)))
  return x + s * lq


def sigma_gate_vjp_np(x, lq, sigma, w, b, log_alpha, ct):
  """float64 gradients of sum(ct * out) in all six inputs, by hand (checked against finite
  differences below)."""
  x, lq, sigma, w, b, log_alpha, ct = map(_f64, (x, lq, sigma, w, b, log_alpha, ct))
  d, g = x.shape[-1], w.shape[-1]
  s = 1.0 / (1.0 + np.exp(-_gate_pre_np(x, lq, sigma, w, b, log_alpha)))
  dh = np.sum(ct * lq, -1, keepdims=True) if g == 1 else ct * lq
  dh = dh * s * (1.0 - s)                                       # [B, N, G]
  dxl = dh @ w.T                                                # [B, N, 2D]
  alpha = np.exp(log_alpha)
  return (ct + dxl[..., :d],
          ct * s + dxl[..., d:],
          -alpha * dh.sum((1, 2)),
          np.einsum("bnc,bng->cg", np.concatenate([x, lq], -1), dh),
          dh.sum((0, 1)),
          np.asarray(-alpha * np.sum(dh * sigma[:, None, None])))


def reduction_sizes_np(x, lq, sigma, w, b, log_alpha, ct, *, with_w=False):
  """Per input, the 2-norm of sum |terms| of its gradient where that gradient sums the gate's
  cotangent dh over tokens (sigma, b, log_alpha; 0 for the others): each term carries its own
  rounding error, so these sums are accurate relative to that size, not to the sum.

  with_w: w's too. Against the reference its 2D x G entries average the terms' independent errors,
  so ||dw|| is its scale; but the same terms summed in another order (shard_map) differ by the
  rounding of partial sums, which grow like sum |terms|.
  """
  x, lq, sigma, w, b, log_alpha, ct = map(_f64, (x, lq, sigma, w, b, log_alpha, ct))
  s = 1.0 / (1.0 + np.exp(-_gate_pre_np(x, lq, sigma, w, b, log_alpha)))
  dh = np.sum(ct * lq, -1, keepdims=True) if w.shape[-1] == 1 else ct * lq
  dh = np.abs(dh * s * (1.0 - s))                               # [B, N, G]
  alpha = np.exp(log_alpha)
  dw = np.linalg.norm(np.einsum("bnc,bng->cg", np.abs(np.concatenate([x, lq], -1)), dh))
  return (0.0, 0.0, alpha * np.linalg.norm(dh.sum((1, 2))), dw if with_w else 0.0,
          np.linalg.norm(dh.sum((0, 1))), alpha * np.sum(dh * sigma[:, None, None]))


def _assert_close(name, actual, expected, tol, scale=0.0):
  """Relative error in the 2-norm (relative to max(|expected|, scale)), computed in float64."""
  actual = _f64(actual)
  assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
  assert np.all(np.isfinite(actual)), f"{name}: non-finite values"
  err = np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), scale)
  assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.3g}"


def _check_grads(grads, args, ct, tol, where=""):
  """The six gradients (dtype and values) against the float64 reference; those that sum over tokens
  relative to the size of their terms (see reduction_sizes_np)."""
  want = sigma_gate_vjp_np(*args, ct)
  for name, arg, got, ref, sc in zip(ARGS, args, grads, want, reduction_sizes_np(*args, ct)):
    assert got.dtype == arg.dtype, f"d{name}{where}: dtype {got.dtype} != {arg.dtype}"
    _assert_close(f"d{name}{where}", got, ref, tol, sc)


@functools.cache
def _fn(impl):
  """The function under test; cached, so that jit finds its compiled programs again (under --seeds
  each test runs with several draws of the same shapes)."""
  if impl == "pallas":
    return functools.partial(sigma_gate, impl="pallas", interpret=True)
  return functools.partial(sigma_gate, impl=impl)


@functools.partial(jax.jit, static_argnums=0)
def _value_and_grads(fn, args, ct):
  """(out, gradients of all six inputs) from jax.vjp with cotangent ct, as one compiled program
  (op-by-op dispatch compiles every primitive separately, which dominates on CPU)."""
  out, vjp = jax.vjp(fn, *args)
  return out, vjp(ct)


@pytest.mark.parametrize("g", [1, 3])
def test_reference_gradients_match_finite_differences(rng, g):
  """The hand-written float64 gradients equal central differences of the float64 forward (smooth,
  derivatives bounded at these scales: the truncation error ~h^2 is far below the tolerance)."""
  d = 3
  args = [rng.normal(size=(2, 4, d)), rng.normal(size=(2, 4, d)), rng.uniform(0, 0.8, size=2),
          0.3 * rng.normal(size=(2 * d, g)), 2 + 0.3 * rng.normal(size=g), np.asarray(1.6)]
  ct = rng.normal(size=(2, 4, d))
  grads = sigma_gate_vjp_np(*args, ct)
  h = 1e-6
  for i, a in enumerate(args):
    fd = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
      plus, minus = [x.copy() for x in args], [x.copy() for x in args]
      plus[i][idx] += h
      minus[i][idx] -= h
      fd[idx] = np.sum(ct * (sigma_gate_np(*plus) - sigma_gate_np(*minus))) / (2 * h)
    np.testing.assert_allclose(grads[i], fd, rtol=1e-6, atol=1e-7, err_msg=ARGS[i])


# (N, D, dtype, gate, parameter dtype) of the gradient tests; the forward tests take the other half
# of {1, 200, 257, 1024} x {32, 64} x {float32, bfloat16} with the other gate, so that every
# combination is checked once and each N and dtype with both gates (interpret mode compiles per
# shape: the full product twice would be slow on CPU).
_GRAD_CASES = [
    (1, 32, "float32", "channel", "float32"),
    (1, 64, "bfloat16", "token", "float32"),
    (200, 64, "float32", "token", "float32"),
    (200, 32, "bfloat16", "channel", "bfloat16"),
    (257, 32, "float32", "channel", "float32"),
    (257, 64, "bfloat16", "channel", "float32"),
    (1024, 64, "float32", "channel", "float32"),
    (1024, 32, "bfloat16", "token", "float32"),
]
_FORWARD_CASES = [
    (1, 64, "float32", "token"),
    (1, 32, "bfloat16", "channel"),
    (200, 32, "float32", "channel"),
    (200, 64, "bfloat16", "token"),
    (257, 64, "float32", "token"),
    (257, 32, "bfloat16", "token"),
    (1024, 32, "float32", "token"),
    (1024, 64, "bfloat16", "channel"),
]


@pytest.mark.parametrize("n, d, dtype, gate", _FORWARD_CASES)
@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_forward_matches_reference(rng, impl, n, d, dtype, gate):
  """Output (shape, dtype, values) equals the float64 reference, G = D and G = 1."""
  g = d if gate == "channel" else 1
  args, _ = _inputs(rng, n, d, g, jnp.dtype(dtype))
  out = jax.jit(_fn(impl))(*args)
  assert out.shape == (B, n, d) and out.dtype == jnp.dtype(dtype)
  _assert_close("out", out, sigma_gate_np(*args), TOL[dtype])


# The kernel takes every gradient case; the XLA reference (plain JAX) half of them.
_GRAD_PARAMS = ([("pallas", *c) for c in _GRAD_CASES]
                + [("xla", *_GRAD_CASES[i]) for i in (1, 3, 4, 6)])


@pytest.mark.parametrize("impl, n, d, dtype, gate, param_dtype", _GRAD_PARAMS)
def test_gradients_match_reference(rng, impl, n, d, dtype, gate, param_dtype):
  """jax.vjp with a random cotangent: the gradient of every input equals the float64 reference
  (and has that input's dtype and shape)."""
  g = d if gate == "channel" else 1
  args, ct = _inputs(rng, n, d, g, jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype))
  out, grads = _value_and_grads(_fn(impl), args, ct)
  _assert_close("out", out, sigma_gate_np(*args), TOL[dtype])
  _check_grads(grads, args, ct, TOL[dtype])


@pytest.mark.parametrize("impl, gate", [("pallas", "token"), ("xla", "token")])
def test_jit_matches_eager_and_reference(rng, impl, gate):
  """Under jax.jit the result equals the eager call and the reference. The eager call leaves
  interpret=None, which must interpret the kernel off-GPU."""
  d = 64
  args, _ = _inputs(rng, 257, d, d if gate == "channel" else 1, jnp.float32)
  out = jax.jit(_fn(impl))(*args)
  _assert_close("jit out", out, _f64(sigma_gate(*args, impl=impl)), 1e-6)
  _assert_close("jit out", out, sigma_gate_np(*args), TOL["float32"])


@pytest.mark.parametrize("impl, gate", [("pallas", "channel"), ("xla", "channel")])
def test_vmap_over_an_extra_axis(rng, impl, gate):
  """vmap over a leading axis of every input (a stack of gates) equals each slice's reference,
  forward and gradients."""
  n, d, vb = 200, 32, 3
  g = d if gate == "channel" else 1
  stacked = [_inputs(rng, n, d, g, jnp.float32) for _ in range(vb)]
  stack = lambda arrays: jnp.asarray(np.stack([np.asarray(a) for a in arrays]))
  args = [stack(a) for a in zip(*(s[0] for s in stacked))]
  ct = stack([s[1] for s in stacked])
  out, grads = _value_and_grads(jax.vmap(_fn(impl)), args, ct)
  assert out.shape == (vb, B, n, d)
  for i, (a, c) in enumerate(stacked):
    _assert_close(f"slice {i}", out[i], sigma_gate_np(*a), TOL["float32"])
    _check_grads([got[i] for got in grads], a, c, TOL["float32"], f" slice {i}")


@pytest.mark.parametrize("impl, gate", [("pallas", "channel"), ("xla", "channel")])
def test_jit_grad(rng, impl, gate):
  """jax.jit(jax.grad) of sum(ct * out) in all six inputs equals the reference."""
  d = 32
  args, ct = _inputs(rng, 200, d, d if gate == "channel" else 1, jnp.float32)
  loss = lambda *a: jnp.sum(_fn(impl)(*a) * ct)
  grads = jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*args)
  _check_grads(grads, args, ct, TOL["float32"])


@pytest.mark.parametrize("impl, gate", [("pallas", "token"), ("xla", "token")])
def test_shard_map_matches_unsharded(rng, impl, gate):
  """Batch over "data" on 8 fake devices (parameters replicated): output and all six gradients
  equal the unsharded ones."""
  mesh = sharding.make_mesh({"data": 4, "fsdp": 1, "model": 2})
  d = 32
  args, ct = _inputs(rng, 257, d, d if gate == "channel" else 1, jnp.float32, b=4)
  tokens = ("batch", None, None)
  dims = (tokens, tokens, ("batch",), (None, None), (None,), ())
  sharded = lambda *a: sharding.shard_kernel(_fn(impl), a, dims, tokens)
  with jax.set_mesh(mesh):
    out, grads = _value_and_grads(sharded, args, ct)
  want_out, want_grads = _value_and_grads(_fn(impl), args, ct)
  _assert_close("sharded out", out, _f64(want_out), 1e-6)
  _assert_close("sharded out", out, sigma_gate_np(*args), TOL["float32"])
  # The sums over tokens add the devices' partial sums in another order: relative to their terms.
  for name, a, b, sc in zip(ARGS, grads, want_grads, reduction_sizes_np(*args, ct, with_w=True)):
    _assert_close(f"sharded d{name}", a, _f64(b), 1e-6, sc)


def test_auto_on_cpu_takes_the_reference(rng):
  """impl="auto" off-GPU: no pallas_call in its jaxpr (forward or grad), same values as "xla"."""
  if jax.default_backend() == "gpu":
    pytest.skip("on a GPU 'auto' may take the kernel")
  args, ct = _inputs(rng, 200, 32, 32, jnp.float32)
  jaxpr = lambda impl: str(jax.make_jaxpr(lambda *a: sigma_gate(*a, impl=impl))(*args))
  grad_jaxpr = lambda impl: str(jax.make_jaxpr(jax.grad(
      lambda *a: jnp.sum(sigma_gate(*a, impl=impl) * ct), argnums=tuple(range(6))))(*args))
  assert "pallas_call" not in jaxpr("auto")
  assert "pallas_call" not in grad_jaxpr("auto")
  assert "pallas_call" in jaxpr("pallas")
  assert "pallas_call" in grad_jaxpr("pallas")
  np.testing.assert_array_equal(sigma_gate(*args, impl="auto"), sigma_gate(*args, impl="xla"))
  np.testing.assert_array_equal(sigma_gate(*args), sigma_gate(*args, impl="xla"))


# One bad argument at a time on top of x, lq [2, 8, 4], sigma [2], w [8, G], b [G], log_alpha [];
# (shape overrides, regex of the argument the message must name).
_BAD_SHAPES = [
    ({"x": (8, 4)}, r"\bx\b"),                       # rank 2
    ({"x": (2, 8, 4, 1)}, r"\bx\b"),                 # rank 4
    ({"lq": (2, 8, 5)}, r"\blq\b"),                  # D differs from x's
    ({"lq": (2, 7, 4)}, r"\blq\b"),                  # N differs from x's
    ({"lq": (2, 8)}, r"\blq\b"),                     # rank 2
    ({"sigma": (2, 1)}, r"\bsigma\b"),               # rank 2
    ({"sigma": (3,)}, r"\bsigma\b"),                 # B differs from x's
    ({"sigma": ()}, r"\bsigma\b"),                   # a scalar
    ({"w": (4, 4)}, r"\bw\b"),                       # D rows, not 2D
    ({"w": (8, 3), "b": (3,)}, r"\bw\b"),            # G not in {1, D}
    ({"w": (8,)}, r"\bw\b"),                         # rank 1
    ({"b": (3,)}, r"\bb\b"),                         # G = 4 but b [3]
    ({"w": (8, 1), "b": (4,)}, r"\bb\b"),            # G = 1 but b [4]
    ({"b": ()}, r"\bb\b"),                           # a scalar
    ({"log_alpha": (2,)}, r"\blog_alpha\b"),         # not a scalar
]


@pytest.mark.parametrize("overrides, arg", _BAD_SHAPES)
@pytest.mark.parametrize("impl", ["pallas", "xla", "auto"])
def test_bad_shapes_name_the_argument(impl, overrides, arg):
  """Wrong rank, mismatched shapes, G not in {1, D}: a ValueError naming the argument and a
  shape."""
  shapes = {"x": (2, 8, 4), "lq": (2, 8, 4), "sigma": (2,), "w": (8, 4), "b": (4,),
            "log_alpha": ()}
  shapes.update(overrides)
  args = [jnp.zeros(shapes[name], jnp.float32) for name in ARGS]
  with pytest.raises(ValueError, match=arg) as info:
    sigma_gate(*args, impl=impl, interpret=True)
  assert any(c in str(info.value) for c in ("[", "(")), f"no shape in: {info.value}"


@pytest.mark.parametrize("arg", ["x", "lq", "w"])
@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_integer_dtype_is_rejected(impl, arg):
  """An integer x, lq or w: a TypeError (or ValueError) naming it."""
  shapes = {"x": (2, 8, 4), "lq": (2, 8, 4), "sigma": (2,), "w": (8, 4), "b": (4,),
            "log_alpha": ()}
  args = {name: jnp.zeros(s, jnp.int32 if name == arg else jnp.float32)
          for name, s in shapes.items()}
  with pytest.raises((TypeError, ValueError), match=rf"\b{arg}\b"):
    sigma_gate(*args.values(), impl=impl, interpret=True)


def test_unknown_impl_is_rejected():
  """impl must be one of "xla", "pallas", "auto"."""
  x = jnp.zeros((2, 8, 4), jnp.float32)
  with pytest.raises(ValueError, match="impl"):
    sigma_gate(x, x, jnp.zeros(2), jnp.zeros((8, 4)), jnp.zeros(4), jnp.zeros(()), impl="flash")


def test_block_sizes_are_a_validated_argument(rng):
  """Another tiling (rows and channel tiles) gives the same result; a bad argument is refused."""
  from kernels.common import BlockSizes
  args, _ = _inputs(rng, 100, 64, 64, jnp.float32)
  other = sigma_gate(*args, impl="pallas", block_sizes=BlockSizes(rows=16, cols=32, num_warps=2))
  np.testing.assert_allclose(other, sigma_gate(*args, impl="pallas"), rtol=1e-6, atol=1e-6)
  with pytest.raises(TypeError, match="block_sizes must be a kernels.common.BlockSizes"):
    sigma_gate(*args, block_sizes=64)
  with pytest.raises(ValueError, match="BlockSizes.cols=100"):
    BlockSizes(rows=64, cols=100)
