import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from core.nn.dit import DiT
from core.nn.lora import apply_with_lora, init_lora, merge, unmerge
from tests.core.nn.random_params import random_params

PATTERNS = [r"attn/qkv", r"mlp/fc\d"]
MODEL = DiT(patch_size=2, width=32, depth=1, num_heads=2, mlp="mixffn")


def _setup(rng, key, random_b=True):
  x = jnp.asarray(rng.normal(size=(2, 8, 4, 3)), jnp.float32)
  t = jnp.asarray(rng.uniform(size=2), jnp.float32)
  # Scale 0.2 (not the default 0.3) keeps the random DiT's attention logits from saturating, where
  # near-tied logits amplify the rounding difference between merged and unmerged kernels (0.3 used
  # up to 22% of the tolerance in 3000 draws; 0.2, 2%).
  params = random_params(MODEL, rng, x, t, scale=0.2)
  lora = init_lora(params, PATTERNS, rank=3, key=key)
  if random_b:
    lora = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray(rng.normal(size=a.shape) * 0.3, a.dtype)
        if path[-1].key == "lora_b" else a, lora)
  return x, t, params, lora


def test_init_lora_shapes_and_zero_b(rng, key):
  x, t, params, lora = _setup(rng, key, random_b=False)
  block = lora["block_0"]
  assert set(block) == {"attn", "mlp"} and set(block["mlp"]) == {"fc1", "fc2"}
  assert block["attn"]["qkv"]["lora_a"].shape == (32, 3)
  assert block["attn"]["qkv"]["lora_b"].shape == (3, 96)
  assert block["mlp"]["fc1"]["lora_a"].shape == (32, 3)
  assert "dwconv" not in block["mlp"]  # a conv kernel is not a Dense kernel
  for leaf in jax.tree.leaves({k: v["lora_b"] for k, v in block["mlp"].items()}):
    np.testing.assert_array_equal(leaf, 0)
  assert np.abs(block["attn"]["qkv"]["lora_a"]).min() > 0
  np.testing.assert_array_equal(apply_with_lora(MODEL, params, lora, x, t),
                                MODEL.apply({"params": params}, x, t))


def test_merged_and_unmerged_forward_agree(rng, key):
  x, t, params, lora = _setup(rng, key)
  scale = 0.5  # alpha / r = 1.5 / 3
  unmerged = apply_with_lora(MODEL, params, lora, x, t, scale=scale)
  merged = MODEL.apply({"params": merge(params, lora, scale)}, x, t)
  np.testing.assert_allclose(unmerged, merged, rtol=1e-4, atol=1e-4 * np.abs(merged).max())
  assert not np.allclose(unmerged, MODEL.apply({"params": params}, x, t), atol=1e-3)


def test_unmerge_restores_params(rng, key):
  _, _, params, lora = _setup(rng, key)
  merged = merge(params, lora, 2.0)
  assert not np.allclose(merged["block_0"]["attn"]["qkv"]["kernel"],
                         params["block_0"]["attn"]["qkv"]["kernel"])
  np.testing.assert_array_equal(merged["block_0"]["attn"]["out"]["kernel"],
                                params["block_0"]["attn"]["out"]["kernel"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               unmerge(merged, lora, 2.0), params)


def test_pattern_without_match_lists_kernels(rng, key):
  _, _, params, _ = _setup(rng, key)
  with pytest.raises(ValueError, match=r"'attn/nope' matches no Dense.*block_0/attn/qkv/kernel"):
    init_lora(params, [r"attn/qkv", r"attn/nope"], rank=2, key=key)
  with pytest.raises(ValueError, match="matches no Dense kernel"):
    init_lora(params, r"dwconv", rank=2, key=key)  # 4-D conv kernels are not adapted


def test_stale_lora_tree_is_an_error(rng, key):
  x, t, params, lora = _setup(rng, key)
  lora["block_7"] = lora["block_0"]
  with pytest.raises(ValueError, match="never called as a Dense.*block_7/attn/qkv"):
    apply_with_lora(MODEL, params, lora, x, t)


class _Heads(nn.Module):
  """A DenseGeneral contracting a middle axis: [B, 4, 3] -> [B, 3, 5]."""

  @nn.compact
  def __call__(self, x):
    return nn.DenseGeneral(5, axis=1, name="proj")(x)


def test_dense_general_merged_and_unmerged_agree(rng, key):
  x = jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32)
  model = _Heads()
  params = random_params(model, rng, x)
  lora = init_lora(params, "proj", rank=2, key=key)
  lora["proj"]["lora_b"] = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
  np.testing.assert_allclose(apply_with_lora(model, params, lora, x, scale=0.7),
                             model.apply({"params": merge(params, lora, 0.7)}, x),
                             rtol=1e-5, atol=1e-5)


def test_conv_lora_merges_as_a_dense_on_the_receptive_field(rng, key):
  """convs=True adapts 4-D kernels: merge adds scale * reshape(A @ B), so the merged conv equals the
  base conv plus the rank-r conv; gradients reach A and B through merge."""
  layer = nn.Conv(5, (3, 3), padding="SAME")
  x = jnp.asarray(rng.normal(size=(2, 6, 7, 4)), jnp.float32)
  params = random_params(layer, rng, x)
  with pytest.raises(ValueError, match="matches no Dense kernel"):    # Dense kernels only by default
    init_lora(params, ["kernel"], rank=2, key=key)
  lora = init_lora(params, ["kernel"], rank=2, key=key, convs=True)
  assert lora["lora_a"].shape == (3 * 3 * 4, 2) and lora["lora_b"].shape == (2, 5)
  lora = {**lora, "lora_b": jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)}
  merged = merge(params, lora, 0.7)
  delta = (0.7 * lora["lora_a"] @ lora["lora_b"]).reshape(3, 3, 4, 5)
  np.testing.assert_allclose(merged["kernel"], params["kernel"] + delta, rtol=1e-6, atol=1e-6)
  base_plus = layer.apply({"params": params}, x) + nn.Conv(5, (3, 3), padding="SAME", use_bias=False).apply(
      {"params": {"kernel": delta}}, x)
  np.testing.assert_allclose(layer.apply({"params": merged}, x), base_plus, rtol=1e-4, atol=1e-4)
  grads = jax.grad(lambda lo: layer.apply({"params": merge(params, lo)}, x).sum())(lora)
  assert np.abs(grads["lora_a"]).max() > 0 and np.abs(grads["lora_b"]).max() > 0
