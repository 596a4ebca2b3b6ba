"""Tests for core/metrics.py against scikit-image and hand counts."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from core import metrics


def _image_pair(seed, shape, data_range):
  """A clean batch in [0, data_range] and a noisy copy of it, so SSIM is far from 0 and from 1."""
  rng = np.random.default_rng(seed)
  clean = rng.uniform(0, 1, shape)
  # Smooth along W so windows hold structure rather than pure noise.
  clean = (clean + np.roll(clean, 1, axis=2) + np.roll(clean, 2, axis=2)) / 3
  noisy = np.clip(clean + 0.1 * rng.standard_normal(shape), 0, 1)
  return clean * data_range, noisy * data_range


@pytest.mark.parametrize("data_range", [1.0, 255.0])
def test_psnr_matches_skimage(data_range):
  a, b = _image_pair(0, (3, 16, 20, 3), data_range)
  got = metrics.psnr(a, b, data_range=data_range)
  assert got.shape == (3,)
  expected = [peak_signal_noise_ratio(a[i], b[i], data_range=data_range) for i in range(3)]
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert np.isinf(metrics.psnr(a, a, data_range=data_range)).all()


def test_rgb_to_y_matches_skimage():
  rgb = np.random.default_rng(1).uniform(0, 1, (2, 5, 7, 3))
  np.testing.assert_allclose(metrics.rgb_to_y(rgb)[..., 0], rgb2ycbcr(rgb)[..., 0], rtol=1e-6)
  np.testing.assert_allclose(metrics.rgb_to_y(255 * rgb, data_range=255.0)[..., 0],
                             rgb2ycbcr(rgb)[..., 0], rtol=1e-6)
  with pytest.raises(ValueError, match="3 channels"):
    metrics.rgb_to_y(rgb[..., :2])


@pytest.mark.parametrize("data_range", [1.0, 255.0])
def test_psnr_y_matches_skimage_on_luma(data_range):
  a, b = _image_pair(2, (2, 12, 12, 3), data_range)
  got = metrics.psnr(a, b, data_range=data_range, channel="y")
  y_a, y_b = rgb2ycbcr(a / data_range)[..., 0], rgb2ycbcr(b / data_range)[..., 0]
  expected = [peak_signal_noise_ratio(y_a[i], y_b[i], data_range=255) for i in range(2)]
  np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("shape,data_range,win_size",
                         [((3, 16, 21, 3), 1.0, 7), ((2, 9, 12, 3), 255.0, 7),
                          ((2, 11, 10, 1), 1.0, 5)])
def test_ssim_matches_skimage(shape, data_range, win_size):
  a, b = _image_pair(3, shape, data_range)
  got = metrics.ssim(a, b, data_range=data_range, win_size=win_size)
  assert got.shape == (shape[0],)
  expected = [structural_similarity(a[i], b[i], data_range=data_range, channel_axis=-1,
                                    win_size=win_size) for i in range(shape[0])]
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert 0.2 < min(expected) and max(expected) < 0.95
  np.testing.assert_allclose(metrics.ssim(a, a, data_range=data_range, win_size=win_size), 1.0,
                             rtol=1e-5)


def test_ssim_y_matches_skimage_on_luma():
  a, b = _image_pair(4, (2, 14, 15, 3), 1.0)
  got = metrics.ssim(a, b, data_range=1.0, channel="y")
  y_a, y_b = rgb2ycbcr(a)[..., 0], rgb2ycbcr(b)[..., 0]
  expected = [structural_similarity(y_a[i], y_b[i], data_range=255) for i in range(2)]
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_bad_metric_arguments_are_rejected():
  a = jnp.zeros((1, 8, 8, 3))
  with pytest.raises(ValueError, match="channel"):
    metrics.ssim(a, a, data_range=1.0, channel="lab")
  with pytest.raises(ValueError, match="win_size"):
    metrics.ssim(a, a, data_range=1.0, win_size=9)
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    metrics.psnr(a, a[0], data_range=1.0)


class _Net(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(5, (3, 3))(x)
    kernel_init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
    return nn.Dense(7, kernel_init=kernel_init)(x)


def test_param_count_matches_a_hand_count():
  x = jnp.zeros((1, 6, 6, 4))
  # Abstract parameters (nothing to compile), with a flax Partitioned box around the Dense kernel.
  params = jax.eval_shape(_Net().init, jax.random.key(0), x)
  assert any(isinstance(p, nn.Partitioned)
             for p in jax.tree.leaves(params, is_leaf=lambda p: isinstance(p, nn.Partitioned)))
  assert metrics.param_count(params) == (3 * 3 * 4 * 5 + 5) + (5 * 7 + 7)
  assert metrics.param_count({"w": np.ones((2, 3)), "b": 1.0}) == 7


def test_flops_of_a_matmul():
  rng = np.random.default_rng(5)
  m, k, n = (int(v) for v in rng.integers(3, 40, 3))
  a, b = jnp.ones((m, k)), jnp.ones((k, n))
  cost = metrics.flops(jnp.matmul, a, b)
  assert cost["flops"] == 2 * m * n * k
  assert cost["macs"] == m * n * k
  if "bytes accessed" in cost:
    assert cost["bytes accessed"] >= 4 * (m * k + k * n + m * n)
  assert math.isclose(metrics.flops(lambda x, *, y: x @ y, a, y=b)["flops"], 2 * m * n * k)


def test_energy_distance_known_answers():
  rng = np.random.default_rng()
  x = rng.normal(size=(300, 2)).astype(np.float32)
  assert metrics.energy_distance(x, x) == 0.0
  # One point each: 2 |a - b| - 0 - 0.
  np.testing.assert_allclose(metrics.energy_distance(np.zeros((1, 2)), np.array([[3.0, 4.0]])), 10.0, rtol=1e-6)
  assert metrics.energy_distance(x, x + 1.0) > metrics.energy_distance(x, x + 0.1) > 0


def test_sliced_w1_of_a_translate():
  rng = np.random.default_rng()
  x = rng.normal(size=(500, 2))
  shift = rng.normal(size=2)
  # Every projection moves by <shift, dir>; the mean of |cos| over directions in the plane is 2 / pi.
  got = metrics.sliced_w1(x, x + shift, rng, num_projections=20000)
  np.testing.assert_allclose(got, 2 / np.pi * np.linalg.norm(shift), rtol=0.03)
  assert metrics.sliced_w1(x, x, rng) == 0.0
