import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core.nn.dit import DiT, DiTBlock, FinalLayer
from tests.core.nn.random_params import random_params

# One small size everywhere: CPU tests pay for compiling each new shape.
B, H, W, C, P = 2, 8, 4, 3, 2  # a non-square image, a 4 x 2 token grid
SMALL = dict(patch_size=P, width=32, depth=1, num_heads=2)


def _inputs(rng):
  x = jnp.asarray(rng.normal(size=(B, H, W, C)), jnp.float32)
  t = jnp.asarray(rng.uniform(size=B), jnp.float32)
  return x, t


@pytest.mark.parametrize("modulation", ["adaln_zero", "adaln_single"])
def test_output_is_exactly_zero_at_init(rng, key, modulation):
  model = DiT(**SMALL, num_classes=3, modulation=modulation)
  x, t = _inputs(rng)
  y = jnp.asarray(rng.integers(0, 4, size=B))
  params = model.init(key, x, t, y)
  v = model.apply(params, x, t, y)
  assert v.shape == x.shape and v.dtype == x.dtype
  np.testing.assert_array_equal(v, np.zeros_like(x))


def test_adaln_zero_block_is_the_identity_at_init(rng, key):
  x = jnp.asarray(rng.normal(size=(B, 8, 32)), jnp.float32)
  c = jnp.asarray(rng.normal(size=(B, 32)), jnp.float32)
  block = DiTBlock(num_heads=2)
  np.testing.assert_array_equal(block.apply(block.init(key, x, c), x, c), x)


VARIANTS = {
    "sincos_gelu": dict(),
    "rope2d_swiglu_qknorm": dict(pos_embed="rope2d", mlp="swiglu", qk_norm="rms", norm="rms"),
    "sana_like": dict(pos_embed="none", modulation="adaln_single", mlp="mixffn", mlp_ratio=2.5),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_run_and_depend_on_inputs(rng, variant):
  model = DiT(**SMALL, **VARIANTS[variant])
  x, t = _inputs(rng)
  params = {"params": random_params(model, rng, x, t)}
  v = model.apply(params, x, t)
  assert v.shape == x.shape and np.isfinite(v).all() and np.abs(v).max() > 0
  assert not np.allclose(v, model.apply(params, x, 1 - t), atol=1e-5)
  assert not np.allclose(v, model.apply(params, x[:, ::-1], t)[:, ::-1], atol=1e-5)


def test_class_conditioning(rng):
  model = DiT(**SMALL, num_classes=3)
  x, t = _inputs(rng)
  y = jnp.asarray([0, 1])
  params = {"params": random_params(model, rng, x, t, y)}
  v = model.apply(params, x, t, y)
  assert not np.allclose(v, model.apply(params, x, t, jnp.asarray([2, 2])), atol=1e-5)
  np.testing.assert_array_equal(model.apply(params, x, t, None),
                                model.apply(params, x, t, jnp.full((B,), 3)))  # None = null label
  with pytest.raises(ValueError, match="num_classes = 0"):
    DiT(**SMALL).init(jax.random.key(0), x, t, y)


def test_adaln_single_shares_one_time_mlp(rng):
  x, t = _inputs(rng)
  shapes = lambda model: jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]
  single = shapes(DiT(**dict(SMALL, depth=2), modulation="adaln_single"))
  zero = shapes(DiT(**dict(SMALL, depth=2)))
  assert single["t_block"]["kernel"].shape == (32, 6 * 32) and "t_block" not in zero
  for i in range(2):
    assert single[f"block_{i}"]["adaln"] == {"scale_shift_table": jax.ShapeDtypeStruct(
        (6, 32), jnp.float32)}
    assert zero[f"block_{i}"]["adaln"]["linear"]["kernel"].shape == (32, 6 * 32)
  assert single["final"]["adaln"]["scale_shift_table"].shape == (2, 32)


def test_cross_attention(rng):
  model = DiT(**SMALL, cross_attention=True)
  x, t = _inputs(rng)
  ctx = jnp.asarray(rng.normal(size=(B, 5, 16)), jnp.float32)
  # Small parameters keep the cross-attention softmax from saturating on one key, where masking the
  # others would change nothing: at the default scale 0.3 the cross-attention's queries are ~170,
  # and the mask left the output within atol in 0.3% of draws (even with keys scaled down by 10).
  params = {"params": random_params(model, rng, x, t, context_BxMxE=ctx, scale=0.1)}
  v = model.apply(params, x, t, context_BxMxE=ctx)
  assert not np.allclose(v, model.apply(params, x, t, context_BxMxE=2 * ctx), atol=1e-5)
  # Random, but never all-True (that would equal no mask) and never all-False (undefined softmax).
  mask = jnp.asarray(rng.random((B, 1, 1, 5)) < 0.5).at[..., 0].set(True).at[..., -1].set(False)
  assert not np.allclose(v, model.apply(params, x, t, context_BxMxE=ctx, context_mask=mask),
                         atol=1e-5)
  with pytest.raises(ValueError, match="context_BxMxE is missing"):
    model.apply(params, x, t)


def test_jit_matches_eager_and_bfloat16_runs(rng):
  model = DiT(**SMALL, pos_embed="rope2d")
  x, t = _inputs(rng)
  # Scale 0.1 keeps the adaLN modulation and the attention logits O(1). At the default 0.3 they are
  # ~4 and ~100: near-tied logits in the saturated softmax turn bfloat16's rounding into a different
  # attention pattern, and the 5% bound failed in 8% of draws (at 0.1 the error is 0.6-0.8%).
  params = {"params": random_params(model, rng, x, t, scale=0.1)}
  v = model.apply(params, x, t)
  np.testing.assert_allclose(jax.jit(model.apply)(params, x, t), v, rtol=1e-4,
                             atol=1e-5 * np.abs(v).max())
  v16 = DiT(**SMALL, pos_embed="rope2d", dtype=jnp.bfloat16).apply(params, x, t)
  assert v16.dtype == jnp.float32  # the input's dtype
  assert np.linalg.norm(v16 - v) < 0.05 * np.linalg.norm(v)


def test_final_layer_is_zero_at_init(rng, key):
  x = jnp.asarray(rng.normal(size=(B, 8, 32)), jnp.float32)
  c = jnp.asarray(rng.normal(size=(B, 32)), jnp.float32)
  layer = FinalLayer(12, modulation="adaln_single")
  out = layer.apply(layer.init(key, x, c), x, c)
  assert out.shape == (B, 8, 12)
  np.testing.assert_array_equal(out, 0)


def test_bad_configuration_errors(rng):
  x, t = _inputs(rng)
  with pytest.raises(ValueError, match="pos_embed must be one of"):
    DiT(**SMALL, pos_embed="learned").init(jax.random.key(0), x, t)
  with pytest.raises(ValueError, match="mlp must be one of"):
    DiT(**SMALL, mlp="relu").init(jax.random.key(0), x, t)
  with pytest.raises(ValueError, match="modulation must be one of"):
    DiT(**SMALL, modulation="film").init(jax.random.key(0), x, t)
  with pytest.raises(ValueError, match="norm kind must be one of"):
    DiT(**SMALL, norm="batch").init(jax.random.key(0), x, t)
  with pytest.raises(ValueError, match="divisible by the patch size 3"):
    DiT(**dict(SMALL, patch_size=3)).init(jax.random.key(0), x, t)
  with pytest.raises(ValueError, match=r"t_B must have shape \[B\]"):
    DiT(**SMALL).init(jax.random.key(0), x, t[:1])
