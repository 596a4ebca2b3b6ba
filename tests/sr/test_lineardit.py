"""sr/lineardit.py: every self-attention of the built LinearDiT is ReLU linear attention (against numpy,
eps 1e-8), the SANA layout (adaLN-single tables, Mix-FFN 2.5x, no position embedding), the zero start,
the softmax twin, and the design doc's 19-block trunk (301 M parameters, 75 G MACs at a 16x16 latent)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax.core import meta

from core import metrics
from core.nn.attention import MultiHeadAttention
from sr import lineardit
from tests.core.nn.random_params import random_params

SMALL = lineardit.Spec(width=32, depth=2, num_heads=2)


def _inputs(rng, b=2, h=3, w=4, c=4):
  return (jnp.asarray(rng.normal(size=(b, h, w, c)), jnp.float32),
          jnp.asarray(rng.uniform(size=(b,)), jnp.float32))


def test_every_self_attention_is_relu_linear_attention(rng):
  model = lineardit.build(SMALL)
  z, t = _inputs(rng)
  params = random_params(model, rng, z, t, scale=0.3)
  calls = []

  def capture(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, MultiHeadAttention) and context.method_name == "__call__":
      calls.append((np.asarray(args[0]), np.asarray(out), jax.tree.map(np.asarray,
                                                                        context.module.variables["params"])))
    return out

  with nn.intercept_methods(capture):
    model.apply({"params": params}, z, t)
  assert len(calls) == SMALL.depth
  heads, d = SMALL.num_heads, SMALL.width
  for x, out, p in calls:
    q, k, v = np.split(x @ p["qkv"]["kernel"] + p["qkv"]["bias"], 3, -1)
    q, k, v = (a.reshape(*a.shape[:2], heads, d // heads) for a in (q, k, v))
    q, k = np.maximum(q, 0), np.maximum(k, 0)
    num = np.einsum("bnhd,bmhd,bmhe->bnhe", q, k, v)
    den = np.einsum("bnhd,bmhd->bnh", q, k)[..., None] + 1e-8
    want = (num / den).reshape(*x.shape[:2], d) @ p["out"]["kernel"] + p["out"]["bias"]
    np.testing.assert_allclose(out, want, rtol=2e-4, atol=2e-4)


def test_sana_layout_zero_start_and_the_softmax_twin(rng):
  model = lineardit.build(SMALL)
  z, t = _inputs(rng)
  params = meta.unbox(model.init(jax.random.key(0), z, t)["params"])
  np.testing.assert_array_equal(model.apply({"params": params}, z, t), 0.0)   # zero final layer
  shapes = jax.tree.map(jnp.shape, params)
  assert shapes["t_block"]["kernel"] == (32, 6 * 32)                 # one shared time MLP
  for i in range(SMALL.depth):
    block = shapes[f"block_{i}"]
    assert block["adaln"]["scale_shift_table"] == (6, 32)
    assert block["mlp"]["fc1"]["kernel"] == (32, 2 * 80)              # Mix-FFN hidden 2.5 x 32
    assert "cross_attn" not in block
  assert shapes["final"]["adaln"]["scale_shift_table"] == (2, 32)
  assert not any("pos" in "/".join(map(str, path)) for path, _ in
                 jax.tree_util.tree_flatten_with_path(shapes)[0])
  twin = lineardit.build(SMALL, attention="xla")
  assert jax.tree.map(jnp.shape, meta.unbox(twin.init(jax.random.key(0), z, t)["params"])) == shapes
  rand = random_params(model, rng, z, t, scale=0.3)
  assert not np.allclose(model.apply({"params": rand}, z, t), twin.apply({"params": rand}, z, t),
                         atol=1e-3)
  with pytest.raises(ValueError, match="attention must be one of"):
    lineardit.build(SMALL, attention="flash")
  with pytest.raises(ValueError, match="multiple of num_heads"):
    lineardit.Spec(width=30, depth=1, num_heads=4)


def test_the_19_block_trunk_has_the_design_docs_size_and_macs():
  """sana_sr.md: a 19-block width-1152 LinearDiT without cross-attention, 301 M parameters, 75 G MACs
  on a 16x16 latent (4x SR to 512 px at f32)."""
  model = lineardit.build(lineardit.SANA_SR_19)
  z = jax.ShapeDtypeStruct((1, 16, 16, 32), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(z.shape), jnp.zeros(t.shape)))
  count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(params))
  assert abs(count - 301e6) < 1e6, count
  macs = metrics.flops(lambda p, z, t: model.apply(p, z, t), params, z, t)["macs"]
  assert abs(macs - 75e9) < 0.03 * 75e9, macs
