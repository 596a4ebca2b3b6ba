"""sr/dcae.py: the space-to-channel shortcuts against torch-order loops, LiteMLA against numpy, shapes
and bad inputs of the autoencoder."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from sr import dcae
from tests.core.nn.random_params import random_params

SMALL = dcae.Spec((8, 16, 32), (1, 1, 1), (1, 1, 1), ("res", "evit", "evit"), latent_channels=8,
                  head_dim=8)


def test_unshuffle_average_matches_a_torch_order_loop(rng):
  b, h, w, c, r = 2, 4, 6, 4, 2
  out = int(rng.choice([1, 2, 4, 8, 16]))
  x = rng.normal(size=(b, h, w, c)).astype(np.float32)
  got = np.asarray(dcae.unshuffle_average(jnp.asarray(x), r, out))
  unshuffled = np.zeros((b, h // r, w // r, c * r * r), np.float32)
  for i in range(h // r):
    for j in range(w // r):
      for ch in range(c):
        for p in range(r):
          for q in range(r):
            unshuffled[:, i, j, ch * r * r + p * r + q] = x[:, i * r + p, j * r + q, ch]
  want = unshuffled.reshape(b, h // r, w // r, out, -1).mean(-1)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_duplicate_shuffle_matches_a_torch_order_loop(rng):
  b, h, w, c, r = 2, 3, 2, 8, 2
  out = int(rng.choice([2, 4, 8, 16]))
  z = rng.normal(size=(b, h, w, c)).astype(np.float32)
  got = np.asarray(dcae.duplicate_shuffle(jnp.asarray(z), r, out))
  rep = out * r * r // c
  want = np.zeros((b, h * r, w * r, out), np.float32)
  for i in range(h):
    for j in range(w):
      for o in range(out):
        for p in range(r):
          for q in range(r):
            want[:, i * r + p, j * r + q, o] = z[:, i, j, (o * r * r + p * r + q) // rep]
  np.testing.assert_allclose(got, want)


def test_the_shortcuts_invert_each_other_without_averaging(rng):
  """With C r^2 output channels nothing is averaged or repeated: the two shortcuts are inverses."""
  x = jnp.asarray(rng.normal(size=(2, 8, 4, 3)), jnp.float32)
  np.testing.assert_array_equal(dcae.duplicate_shuffle(dcae.unshuffle_average(x, 2, 12), 2, 3), x)
  # Averaging then repeating a constant-per-group signal loses nothing either.
  z = jnp.asarray(rng.normal(size=(1, 2, 2, 4)), jnp.float32)
  np.testing.assert_allclose(dcae.unshuffle_average(dcae.duplicate_shuffle(z, 2, 4), 2, 4), z,
                             rtol=1e-6, atol=1e-6)


def test_lite_mla_matches_numpy(rng):
  """qkv 1x1, the 5x5 depthwise + per-(head, q/k/v) grouped 1x1 branch, ReLU linear attention per head
  over every pixel (eps 1e-15), 1x1 projection, RMSNorm with scale and bias."""
  b, h, w, c, dim = 2, 5, 4, 8, 4
  heads = c // dim
  mla = dcae.LiteMLA(head_dim=dim, kernel_impl="xla")
  x = rng.normal(size=(b, h, w, c)).astype(np.float32)
  params = jax.tree.map(np.asarray, random_params(mla, rng, jnp.asarray(x), scale=0.4))
  got = np.asarray(mla.apply({"params": jax.tree.map(jnp.asarray, params)}, jnp.asarray(x)))
  qkv = x @ params["qkv"]["kernel"][0, 0]                                      # [b, h, w, 3c]
  dw = params["aggreg_5_dw"]["kernel"][:, :, 0]                                # [5, 5, 3c]
  agg = np.stack([np.stack([ndimage.correlate(qkv[i, ..., ch], dw[..., ch], mode="constant")
                            for ch in range(3 * c)], -1) for i in range(b)])
  pw = params["aggreg_5_pw"]["kernel"][0, 0]                                   # [dim, 3c]
  agg = np.concatenate([agg[..., g * dim:(g + 1) * dim] @ pw[:, g * dim:(g + 1) * dim]
                        for g in range(3 * heads)], -1)
  both = np.concatenate([qkv, agg], -1).reshape(b, h * w, 2 * heads, 3, dim)
  out = np.zeros((b, h * w, 2 * heads, dim), np.float32)
  for i in range(b):
    for hd in range(2 * heads):
      q, k, v = (np.maximum(both[i, :, hd, j], 0) if j < 2 else both[i, :, hd, j] for j in range(3))
      out[i, :, hd] = (q @ (k.T @ v)) / (q @ k.sum(0)[:, None] + 1e-15)
  y = out.reshape(b, h, w, -1) @ params["proj"]["kernel"][0, 0]
  y = y / np.sqrt(np.mean(y ** 2, -1, keepdims=True) + 1e-5) * params["norm"]["scale"] + params["norm"]["bias"]
  np.testing.assert_allclose(got, y, rtol=2e-4, atol=2e-4)


def test_autoencoder_shapes_and_bad_inputs(rng):
  model = dcae.DCAE(SMALL, kernel_impl="xla")
  x = jnp.asarray(rng.uniform(-1, 1, size=(2, 16, 8, 3)), jnp.float32)
  params = random_params(model, rng, x, scale=0.1)
  z = model.apply({"params": params}, x, method="encode")
  assert z.shape == (2, 4, 2, 8) and SMALL.factor == 4
  y = model.apply({"params": params}, z, method="decode")
  assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))
  with pytest.raises(ValueError, match="multiples of 4"):
    model.apply({"params": params}, x[:, :14], method="encode")
  with pytest.raises(ValueError, match=r"\[B, h, w, 8\]"):
    model.apply({"params": params}, z[..., :4], method="decode")
  with pytest.raises(ValueError, match="one entry per stage"):
    dcae.Spec((8, 16), (1,), (1, 1), ("res", "res"))
  with pytest.raises(ValueError, match="blocks must be in"):
    dcae.Spec((8,), (1,), (1,), ("conv",))


def test_the_sana_configuration_is_f32c32_with_six_stages():
  spec = dcae.SANA_F32C32
  assert spec.factor == 32 and spec.latent_channels == 32
  shapes = jax.eval_shape(lambda: dcae.DCAE(spec, kernel_impl="xla").init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3))))["params"]
  count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
  # mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers stores its weights as 1.25 GB of float32: ~312 M.
  assert abs(count - 1.25e9 / 4) < 0.01 * 1.25e9 / 4, count
