"""core/nn/conv.py against numpy loops: pixel (un)shuffle, replicate padding, padded convs,
GroupNorm, the pre-activation ResBlock, down/up-sampling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from core.nn import conv
from tests.core.nn.random_params import random_params


def _conv_np(x, kernel, bias, stride, pads, mode):
  """out[b, i, j, o] = sum x_pad[b, i*s + di, j*s + dj, c] kernel[di, dj, c, o] + bias[o]."""
  (t, bt), (l, r) = pads
  xp = np.pad(x, ((0, 0), (t, bt), (l, r), (0, 0)), mode="edge" if mode == "replicate" else "constant")
  k = kernel.shape[0]
  h = (xp.shape[1] - k) // stride + 1
  w = (xp.shape[2] - k) // stride + 1
  out = np.zeros((x.shape[0], h, w, kernel.shape[-1]))
  for di in range(k):
    for dj in range(k):
      patch = xp[:, di:di + stride * h:stride, dj:dj + stride * w:stride, :]
      out += patch @ kernel[di, dj]
  return out + (0 if bias is None else bias)


def _group_norm_np(x, groups, scale, bias, eps=1e-6):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def _silu(x):
  return x / (1 + np.exp(-x))


def test_pixel_unshuffle_matches_a_loop_and_shuffle_inverts_it(rng):
  r = int(rng.integers(2, 4))
  x = rng.normal(size=(2, 3 * r, 2 * r, 5)).astype(np.float32)
  y = np.asarray(conv.pixel_unshuffle(jnp.asarray(x), r))
  assert y.shape == (2, 3, 2, r * r * 5)
  for i in range(3):
    for j in range(2):
      for dy in range(r):
        for dx in range(r):
          np.testing.assert_array_equal(y[:, i, j, (dy * r + dx) * 5:(dy * r + dx + 1) * 5],
                                        x[:, i * r + dy, j * r + dx, :])
  np.testing.assert_array_equal(conv.pixel_shuffle(jnp.asarray(y), r), x)
  with pytest.raises(ValueError, match="divisible by r=2"):
    conv.pixel_unshuffle(jnp.zeros((1, 3, 4, 1)), 2)
  with pytest.raises(ValueError, match="channels 6 must be divisible by r\\*r=4"):
    conv.pixel_shuffle(jnp.zeros((1, 2, 2, 6)), 2)


def test_replicate_pad_and_nearest_upsampling(rng):
  x = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
  np.testing.assert_array_equal(conv.replicate_pad(jnp.asarray(x), ((1, 2), (0, 3))),
                                np.pad(x, ((0, 0), (1, 2), (0, 3), (0, 0)), mode="edge"))
  np.testing.assert_array_equal(conv.upsample_nearest(jnp.asarray(x), 3),
                                x.repeat(3, axis=1).repeat(3, axis=2))
  with pytest.raises(ValueError, match=">= 0"):
    conv.replicate_pad(jnp.asarray(x), -1)


@pytest.mark.parametrize("kernel_size, stride, padding", [(3, 1, "zeros"), (3, 1, "replicate"),
                                                         (3, 2, "zeros"), (3, 2, "replicate"),
                                                         (1, 1, "zeros"), (4, 2, "replicate")])
def test_conv_is_the_padded_correlation(rng, kernel_size, stride, padding):
  x = rng.normal(size=(2, 8, 6, 3)).astype(np.float32)
  layer = conv.Conv(4, kernel_size, stride=stride, padding=padding)
  params = random_params(layer, rng, jnp.asarray(x))
  out = np.asarray(layer.apply({"params": params}, jnp.asarray(x)))
  assert out.shape == (2, 8 // stride, 6 // stride, 4)
  pads = (conv.same_padding(kernel_size, stride),) * 2
  want = _conv_np(x.astype(np.float64), np.asarray(params["conv"]["kernel"], np.float64),
                  np.asarray(params["conv"]["bias"], np.float64), stride, pads, padding)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)


def test_resblock_matches_numpy_and_starts_as_the_identity(rng):
  x = rng.normal(size=(2, 6, 6, 8)).astype(np.float32)
  block = conv.ResBlock(features=16, num_groups=4)
  params = random_params(block, rng, jnp.asarray(x))
  out = np.asarray(block.apply({"params": params}, jnp.asarray(x)))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  same = (conv.same_padding(3, 1),) * 2
  h = _silu(_group_norm_np(x, 4, p["norm1"]["scale"], p["norm1"]["bias"]))
  h = _conv_np(h, p["conv1"]["conv"]["kernel"], p["conv1"]["conv"]["bias"], 1, same, "zeros")
  h = _silu(_group_norm_np(h, 4, p["norm2"]["scale"], p["norm2"]["bias"]))
  h = _conv_np(h, p["conv2"]["conv"]["kernel"], p["conv2"]["conv"]["bias"], 1, same, "zeros")
  skip = _conv_np(x, p["skip"]["conv"]["kernel"], p["skip"]["conv"]["bias"], 1, ((0, 0), (0, 0)),
                  "zeros")
  np.testing.assert_allclose(out, skip + h, rtol=1e-4, atol=1e-4)
  # Freshly initialised with equal channels: exactly the identity.
  same_width = conv.ResBlock(num_groups=4)
  init = meta.unbox(same_width.init(jax.random.PRNGKey(0), jnp.asarray(x)))
  np.testing.assert_array_equal(same_width.apply(init, jnp.asarray(x)), x)
  with pytest.raises(ValueError, match="12 channels are not divisible into 8 groups"):
    conv.ResBlock(num_groups=8).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 12)))


def _apply_random(layer, rng, x):
  """(output, float64 kernel, float64 bias) of a layer with one inner Conv, at random parameters."""
  params = random_params(layer, rng, jnp.asarray(x))
  out = np.asarray(layer.apply({"params": params}, jnp.asarray(x)))
  inner = params["conv"]["conv"]
  return out, np.asarray(inner["kernel"], np.float64), np.asarray(inner["bias"], np.float64)


@pytest.mark.parametrize("kind", conv.DOWN_KINDS)
def test_downsample(rng, kind):
  x = rng.normal(size=(2, 8, 4, 3)).astype(np.float32)
  layer = conv.Downsample(features=5, kind=kind)
  out, k, b = _apply_random(layer, rng, x)
  if kind == "conv":
    want = _conv_np(x, k, b, 2, ((0, 1), (0, 1)), "zeros")
  else:
    want = _conv_np(np.asarray(conv.pixel_unshuffle(jnp.asarray(x), 2)), k, b, 1, ((0, 0),) * 2, "zeros")
  assert out.shape == (2, 4, 2, 5)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", conv.UP_KINDS)
def test_upsample(rng, kind):
  x = rng.normal(size=(2, 3, 4, 6)).astype(np.float32)
  layer = conv.Upsample(features=2, kind=kind)
  out, k, b = _apply_random(layer, rng, x)
  same = ((1, 1), (1, 1))
  if kind == "nearest":
    want = _conv_np(x.repeat(2, 1).repeat(2, 2), k, b, 1, same, "zeros")
  else:
    want = np.asarray(conv.pixel_shuffle(jnp.asarray(_conv_np(x, k, b, 1, same, "zeros")), 2))
  assert out.shape == (2, 6, 8, 2)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="Upsample kind must be one of"):
    conv.Upsample(kind="bilinear").init(jax.random.PRNGKey(0), jnp.asarray(x))


@pytest.mark.parametrize("c, features, k, groups", [(6, 6, 3, 6), (12, 12, 5, 12), (12, 6, 1, 3),
                                                    (8, 8, 3, 2)])
def test_grouped_conv_equals_flax_conv_with_feature_groups(rng, c, features, k, groups):
  """The CPU paths (depthwise as shifted sums, grouped 1x1 as per-group matmuls) and the plain one
  against nn.Conv with feature_group_count, forward and gradients, on an odd-sized image."""
  x = jnp.asarray(rng.normal(size=(2, 7, 9, c)), jnp.float32)
  layer = conv.GroupedConv(features, k, groups=groups)
  ref = conv.nn.Conv(features, (k, k), padding=[(k // 2, k // 2)] * 2, feature_group_count=groups)
  params = random_params(layer, rng, x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, meta.unbox(ref.init(jax.random.PRNGKey(0), x))["params"])
  f = lambda m: (lambda p, x: (m.apply({"params": p}, x) ** 2).sum())
  np.testing.assert_allclose(layer.apply({"params": params}, x), ref.apply({"params": params}, x),
                             rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.grad(f(layer), argnums=(0, 1))(params, x)),
                  jax.tree.leaves(jax.grad(f(ref), argnums=(0, 1))(params, x))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="divisible by groups"):
    conv.GroupedConv(features, k, groups=groups + 1).init(jax.random.PRNGKey(0), x)
