import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core.nn.attention import MultiHeadAttention, dot_product_attention
from core.nn.embeddings import rope_1d
from tests.core.nn.random_params import random_params


def softmax_attention_loop(q, k, v, mask=None):
  """float64 softmax attention, one (batch, head, query) at a time.

  q [B, Nq, H, D]; k, v [B, Nk, H, D]; mask broadcastable to [B, H, Nq, Nk].
  """
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, nq, h, d = q.shape
  nk = k.shape[1]
  mask = np.ones((b, h, nq, nk), bool) if mask is None else np.broadcast_to(mask, (b, h, nq, nk))
  out = np.zeros_like(q)
  for bi in range(b):
    for hi in range(h):
      for i in range(nq):
        logits = k[bi, :, hi] @ q[bi, i, hi] / np.sqrt(d)
        logits = np.where(mask[bi, hi, i], logits, -np.inf)
        p = np.exp(logits - logits.max())
        out[bi, i, hi] = (p / p.sum()) @ v[bi, :, hi]
  return out


def _qkv(rng, b=2, nq=8, nk=4, h=2, d=16):
  return tuple(jnp.asarray(rng.normal(size=s), jnp.float32)
               for s in ((b, nq, h, d), (b, nk, h, d), (b, nk, h, d)))


def test_xla_matches_loop_without_mask(rng):
  q, k, v = _qkv(rng)
  np.testing.assert_allclose(dot_product_attention(q, k, v), softmax_attention_loop(q, k, v),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_shape", [(2, 1, 8, 4), (2, 2, 8, 4), (8, 4)])
def test_xla_matches_loop_with_mask(rng, mask_shape):
  q, k, v = _qkv(rng)
  mask = rng.random(mask_shape) < 0.5
  mask[..., 0] = True  # every query attends to something
  mask[..., 0, -1] = False  # and one is denied a key: never all-True, which would equal no mask
  out = dot_product_attention(q, k, v, mask=jnp.asarray(mask))
  np.testing.assert_allclose(out, softmax_attention_loop(q, k, v, mask), rtol=1e-5, atol=1e-5)
  assert not np.allclose(out, softmax_attention_loop(q, k, v), atol=1e-3)


def test_block_causal_mask(rng):
  """Bidirectional inside blocks of 2, causal across them (block diffusion, BD3-LM)."""
  q, k, v = _qkv(rng, nk=8)
  blocks = np.arange(8) // 2
  mask = blocks[:, None] >= blocks[None, :]
  out = dot_product_attention(q, k, v, mask=jnp.asarray(mask))
  np.testing.assert_allclose(out, softmax_attention_loop(q, k, v, mask), rtol=1e-5, atol=1e-5)
  # The first block cannot see later keys: changing them leaves its output alone.
  v2 = v.at[:, 2:].set(rng.normal(size=v[:, 2:].shape))
  out2 = dot_product_attention(q, k, v2, mask=jnp.asarray(mask))
  np.testing.assert_array_equal(out[:, :2], out2[:, :2])
  assert not np.allclose(out[:, 2:], out2[:, 2:])


def test_fully_masked_row_gets_mean_of_values(rng):
  q, k, v = _qkv(rng)
  mask = np.ones((8, 4), bool)
  mask[1] = False
  out = dot_product_attention(q, k, v, mask=jnp.asarray(mask))
  np.testing.assert_allclose(out[:, 1], v.mean(axis=1), rtol=1e-5, atol=1e-5)


def test_auto_on_cpu_equals_xla(rng):
  if jax.default_backend() == "gpu":
    pytest.skip("on a GPU 'auto' may choose cuDNN")
  q, k, v = _qkv(rng)
  mask = jnp.asarray(rng.random((2, 1, 8, 4)) < 0.7).at[..., 0].set(True)
  for m in (None, mask):
    np.testing.assert_array_equal(dot_product_attention(q, k, v, mask=m, impl="auto"),
                                  dot_product_attention(q, k, v, mask=m, impl="xla"))


def test_unknown_impl_lists_choices(rng):
  with pytest.raises(ValueError, match="xla.*cudnn.*auto.*linear"):
    dot_product_attention(*_qkv(rng), impl="flash")


def test_cudnn_without_gpu_is_a_clear_error(rng):
  if jax.default_backend() == "gpu":
    pytest.skip("a GPU is present")
  with pytest.raises(ValueError, match="cudnn.*needs a GPU"):
    dot_product_attention(*_qkv(rng), impl="cudnn")


def test_cudnn_rejects_float32_with_a_reason(rng, monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(ValueError, match="bfloat16 or float16"):
    dot_product_attention(*_qkv(rng), impl="cudnn")


def linear_attention_loop(q, k, v, eps=1e-6):
  """float64 ReLU linear attention, one (batch, head, query) at a time."""
  q, k, v = (np.maximum(np.asarray(a, np.float64), 0) if i < 2 else np.asarray(a, np.float64)
             for i, a in enumerate((q, k, v)))
  out = np.zeros(q.shape[:3] + v.shape[3:])
  for bi in range(q.shape[0]):
    for hi in range(q.shape[2]):
      for i in range(q.shape[1]):
        weights = k[bi, :, hi] @ q[bi, i, hi]       # [Nk]: relu(q_i) . relu(k_j)
        out[bi, i, hi] = weights @ v[bi, :, hi] / (weights.sum() + eps)
  return out


def test_linear_is_relu_linear_attention(rng):
  q, k, v = _qkv(rng)
  np.testing.assert_allclose(dot_product_attention(q, k, v, impl="linear"),
                             linear_attention_loop(q, k, v, eps=1e-8), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="mask"):
    dot_product_attention(q, k, v, impl="linear", mask=jnp.ones((8, 4), bool))


def test_bad_shapes_are_clear_errors(rng):
  q, k, v = _qkv(rng)
  with pytest.raises(ValueError, match=r"k and v must be \[B, Nk, H, D\]"):
    dot_product_attention(q, k[..., :4], v)
  with pytest.raises(ValueError, match="mask must be boolean"):
    dot_product_attention(q, k, v, mask=jnp.ones((8, 3), bool))
  with pytest.raises(ValueError, match="mask must be boolean"):
    dot_product_attention(q, k, v, mask=jnp.ones((8, 4), jnp.float32))


def _rope_np(x_BxNxHxD, pos_N):
  """Rotate-half RoPE in numpy, frequencies 10000^(-i / (D/2))."""
  d = x_BxNxHxD.shape[-1]
  angles = pos_N[:, None] * 10000.0 ** (-np.arange(d // 2) / (d // 2))
  cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
  x1, x2 = np.split(x_BxNxHxD, 2, -1)
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def test_self_attention_matches_manual(rng):
  b, n, d, h = 2, 8, 32, 2
  x = rng.normal(size=(b, n, d))
  pos = rng.permutation(n)
  mha = MultiHeadAttention(h, qk_norm="rms")
  rope = rope_1d(jnp.asarray(pos), d // h)
  p = jax.tree.map(np.asarray, random_params(mha, rng, jnp.asarray(x, jnp.float32), rope=rope))
  out = mha.apply({"params": p}, jnp.asarray(x, jnp.float32), rope=rope)

  qkv = (x @ p["qkv"]["kernel"] + p["qkv"]["bias"]).reshape(b, n, 3, h, d // h)
  rms = lambda a, s: a / np.sqrt(np.mean(a**2, -1, keepdims=True) + 1e-6) * s
  q = _rope_np(rms(qkv[:, :, 0], p["q_norm"]["scale"]), pos)
  k = _rope_np(rms(qkv[:, :, 1], p["k_norm"]["scale"]), pos)
  o = softmax_attention_loop(q, k, qkv[:, :, 2]).reshape(b, n, d)
  np.testing.assert_allclose(out, o @ p["out"]["kernel"] + p["out"]["bias"], rtol=1e-4, atol=1e-4)


def _split(layer, n):
  """One projection {"kernel": [D, n*E], "bias": [n*E]} as n projections of E outputs."""
  return [{"kernel": k, "bias": b}
          for k, b in zip(np.split(layer["kernel"], n, -1), np.split(layer["bias"], n, -1))]


def test_fused_and_separate_projections_agree(rng):
  x = jnp.asarray(rng.normal(size=(2, 8, 32)), jnp.float32)
  ctx = jnp.asarray(rng.normal(size=(2, 4, 24)), jnp.float32)
  fused, separate = MultiHeadAttention(2), MultiHeadAttention(2, fused_qkv=False)
  for context in (None, ctx):
    pf = random_params(fused, rng, x, context)
    if context is None:
      q, k, v = _split(pf["qkv"], 3)
    else:
      q, (k, v) = pf["q"], _split(pf["kv"], 2)
    ps = {"q": q, "k": k, "v": v, "out": pf["out"]}
    np.testing.assert_allclose(fused.apply({"params": pf}, x, context),
                               separate.apply({"params": ps}, x, context),
                               rtol=1e-5, atol=1e-5)


def test_cross_attention_shape_and_dependence(rng):
  x = jnp.asarray(rng.normal(size=(2, 8, 32)), jnp.float32)
  ctx = jnp.asarray(rng.normal(size=(2, 4, 24)), jnp.float32)
  mha = MultiHeadAttention(2, qk_norm="layer")
  p = random_params(mha, rng, x, ctx)
  out = mha.apply({"params": p}, x, ctx)
  assert out.shape == x.shape
  assert not np.allclose(out, mha.apply({"params": p}, x, ctx[:, ::-1] * 2.0), atol=1e-4)
  with pytest.raises(ValueError, match="rope is for self-attention"):
    mha.apply({"params": p}, x, ctx, rope=rope_1d(jnp.arange(8), 16))


def test_bfloat16_compute(rng):
  x = jnp.asarray(rng.normal(size=(2, 8, 32)), jnp.bfloat16)
  mha = MultiHeadAttention(2, dtype=jnp.bfloat16, impl="auto")
  # Scale 0.15 keeps the logits and the output O(1), so the fixed tolerances are ~20 bfloat16
  # round-offs (2^-8) of the output; at the default 0.3 the output is ~8 and bfloat16's error alone
  # passed atol=0.1 in 0.4% of draws.
  params = random_params(mha, rng, x, scale=0.15)
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(params))
  out = mha.apply({"params": params}, x)
  assert out.dtype == jnp.bfloat16 and out.shape == x.shape
  ref = MultiHeadAttention(2).apply({"params": params}, x.astype(jnp.float32))
  np.testing.assert_allclose(out.astype(jnp.float32), ref, rtol=0.1, atol=0.1)


def test_cudnn_matches_xla_on_gpu(rng):
  """Runs only where JAX's backend is a GPU (e.g. JAX_PLATFORMS=cuda pytest -k gpu)."""
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU")
  q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in _qkv(rng, nq=256, nk=256, h=4, d=64))
  blocks = np.arange(256) // 64
  for mask in (None, jnp.asarray(blocks[:, None] >= blocks[None, :])):
    f = lambda q, k, v, impl: dot_product_attention(q, k, v, mask=mask, impl=impl)
    hlo = jax.jit(f, static_argnums=3).lower(q, k, v, "auto").compile().as_text()
    assert "cudnn" in hlo  # "auto" chose cuDNN for bf16 with head dim 64
    out = {impl: jax.jit(f, static_argnums=3)(q, k, v, impl) for impl in ("cudnn", "xla")}
    np.testing.assert_allclose(out["cudnn"].astype(np.float32), out["xla"].astype(np.float32),
                               atol=2e-2)
    grad = {impl: jax.jit(jax.grad(lambda q, impl: f(q, k, v, impl).astype(jnp.float32).sum()),
                          static_argnums=1)(q, impl) for impl in ("cudnn", "xla")}
    np.testing.assert_allclose(grad["cudnn"].astype(np.float32), grad["xla"].astype(np.float32),
                               atol=5e-2, rtol=5e-2)
