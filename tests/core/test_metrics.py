"""Tests for core/metrics.py against scikit-image, BasicSR's NIQE and hand counts."""
import math
import os
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from skimage import data
from skimage.color import deltaE_ciede2000, rgb2lab, rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from core import metrics


def _image_pair(rng, shape, data_range):
  """A clean batch in [0, data_range] and a noisy copy of it, so SSIM is far from 0 and from 1."""
  clean = rng.uniform(0, 1, shape)
  # Smooth along W so windows hold structure rather than pure noise.
  clean = (clean + np.roll(clean, 1, axis=2) + np.roll(clean, 2, axis=2)) / 3
  noisy = np.clip(clean + 0.1 * rng.standard_normal(shape), 0, 1)
  return clean * data_range, noisy * data_range


@pytest.mark.parametrize("data_range", [1.0, 255.0])
def test_psnr_matches_skimage(data_range, rng):
  a, b = _image_pair(rng, (3, 16, 20, 3), data_range)
  got = metrics.psnr(a, b, data_range=data_range)
  assert got.shape == (3,)
  expected = [peak_signal_noise_ratio(a[i], b[i], data_range=data_range) for i in range(3)]
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert np.isinf(metrics.psnr(a, a, data_range=data_range)).all()


def test_rgb_to_y_matches_skimage(rng):
  rgb = rng.uniform(0, 1, (2, 5, 7, 3))  # Y >= 16: no cancellation, float32 is good to a few ulps
  np.testing.assert_allclose(metrics.rgb_to_y(rgb)[..., 0], rgb2ycbcr(rgb)[..., 0], rtol=1e-6)
  np.testing.assert_allclose(metrics.rgb_to_y(255 * rgb, data_range=255.0)[..., 0],
                             rgb2ycbcr(rgb)[..., 0], rtol=1e-6)
  with pytest.raises(ValueError, match="3 channels"):
    metrics.rgb_to_y(rgb[..., :2])


@pytest.mark.parametrize("data_range", [1.0, 255.0])
def test_psnr_y_matches_skimage_on_luma(data_range, rng):
  a, b = _image_pair(rng, (2, 12, 12, 3), data_range)
  got = metrics.psnr(a, b, data_range=data_range, channel="y")
  y_a, y_b = rgb2ycbcr(a / data_range)[..., 0], rgb2ycbcr(b / data_range)[..., 0]
  expected = [peak_signal_noise_ratio(y_a[i], y_b[i], data_range=255) for i in range(2)]
  np.testing.assert_allclose(got, expected, rtol=1e-5)


# The single-channel case is 17 x 16 (13 x 12 windows): at 11 x 10 an image's SSIM spread enough to
# reach 0.94 in 400000 draws; each case here stayed within [0.67, 0.93] over 200000 draws.
@pytest.mark.parametrize("shape,data_range,win_size",
                         [((3, 16, 21, 3), 1.0, 7), ((2, 9, 12, 3), 255.0, 7),
                          ((2, 17, 16, 1), 1.0, 5)])
def test_ssim_matches_skimage(shape, data_range, win_size, rng):
  a, b = _image_pair(rng, shape, data_range)
  got = metrics.ssim(a, b, data_range=data_range, win_size=win_size)
  assert got.shape == (shape[0],)
  expected = [structural_similarity(a[i], b[i], data_range=data_range, channel_axis=-1,
                                    win_size=win_size) for i in range(shape[0])]
  # float32 loses log2(kappa) bits to E[x^2] - E[x]^2, kappa = E[x^2] / (var + c2) <= 22 here: the
  # relative error has a std of <= 0.43 eps32 kappa = 1.1e-6, so 1e-5 is >= 9 std.
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert 0.2 < min(expected) and max(expected) < 0.95
  np.testing.assert_allclose(metrics.ssim(a, a, data_range=data_range, win_size=win_size), 1.0,
                             rtol=1e-5)


def test_ssim_y_matches_skimage_on_luma(rng):
  a, b = _image_pair(rng, (2, 14, 15, 3), 1.0)
  got = metrics.ssim(a, b, data_range=1.0, channel="y")
  y_a, y_b = rgb2ycbcr(a)[..., 0], rgb2ycbcr(b)[..., 0]
  expected = [structural_similarity(y_a[i], y_b[i], data_range=255) for i in range(2)]
  # Y sits at ~125 with a window std of ~25, so float32's E[Y^2] - E[Y]^2 loses log2(kappa) bits,
  # kappa = E[Y^2] / (var + c2) averaged over windows: 14..44 over 20000 draws (RGB tests: 4..22).
  # The relative error has a std of ~0.43 eps32 kappa (max 1.8 eps32 kappa), 1e-5 being only ~4.5
  # std for Y; rtol = 8 eps32 * 42 = 4e-5 is still >= 9 std for any kappa up to 80.
  np.testing.assert_allclose(got, expected, rtol=4e-5)


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


def test_flops_of_a_matmul(rng):
  m, k, n = (int(v) for v in rng.integers(3, 40, 3))
  a, b = jnp.ones((m, k)), jnp.ones((k, n))
  cost = metrics.flops(jnp.matmul, a, b)
  assert cost["flops"] == 2 * m * n * k
  assert cost["macs"] == m * n * k
  if "bytes accessed" in cost:
    assert cost["bytes accessed"] >= 4 * (m * k + k * n + m * n)
  assert math.isclose(metrics.flops(lambda x, *, y: x @ y, a, y=b)["flops"], 2 * m * n * k)


def test_energy_distance_known_answers(rng):
  x = rng.normal(size=(300, 2)).astype(np.float32)
  assert metrics.energy_distance(x, x) == 0.0
  # One point each: 2 |a - b| - 0 - 0.
  np.testing.assert_allclose(metrics.energy_distance(np.zeros((1, 2)), np.array([[3.0, 4.0]])), 10.0, rtol=1e-6)
  # A shift d moves it by about |d|^2 E[1 / |X - X'|] / 2 = 0.0089 for d = (0.1, 0.1) (>= 0.0086
  # over 300 draws), far above float32's error on these means (< 1e-6).
  assert metrics.energy_distance(x, x + 1.0) > metrics.energy_distance(x, x + 0.1) > 0


def test_sliced_w1_of_a_translate(rng):
  x = rng.normal(size=(500, 2))
  shift = rng.normal(size=2)
  # Every projection moves by <shift, dir>; the mean of |cos| over directions in the plane is 2 / pi.
  # |cos| has std 0.31, so the mean over 20000 directions is within 3% of 2 / pi by 8.8 s.e.
  got = metrics.sliced_w1(x, x + shift, rng, num_projections=20000)
  np.testing.assert_allclose(got, 2 / np.pi * np.linalg.norm(shift), rtol=0.03)
  assert metrics.sliced_w1(x, x, rng) == 0.0


def test_bootstrap_distances_match_the_plain_distances(rng):
  x = rng.normal(size=(200, 2)).astype(np.float32)
  y = (rng.normal(size=(200, 2)) + 0.5).astype(np.float32)
  out = metrics.bootstrap_distances(x, y, resamples=3, seed=7, num_projections=1024)
  np.testing.assert_allclose(out["energy"], metrics.energy_distance(x, y), rtol=1e-6)
  # Other directions: 1024 of them put the mean of |<shift, dir>|-like gaps within ~1.5% (1 s.e.)
  # of another draw's, so 20% is > 13 s.e.
  other = metrics.sliced_w1(x, y, np.random.default_rng(int(rng.integers(1 << 30))), 1024)
  np.testing.assert_allclose(out["sw1"], other, rtol=0.2)
  assert out["energy_std"] > 0 and out["sw1_std"] > 0
  # The seed fixes the resamples and directions: the same call gives the same numbers.
  assert metrics.bootstrap_distances(x, y, resamples=3, seed=7, num_projections=1024) == out


def test_class_diversity_by_hand(rng):
  images = np.zeros((4, 2, 2, 1))
  offsets = rng.uniform(0.5, 3, size=2)
  images[1] += offsets[0]      # class 0: 4 pixels differ by offsets[0]: L2 distance 2 offsets[0]
  images[3] += offsets[1]
  np.testing.assert_allclose(metrics.class_diversity(images, np.array([0, 0, 1, 1])), offsets.sum())


def test_mean_and_se_and_paired_se_match_numpy(rng):
  n = int(rng.integers(2, 50))
  a = rng.normal(3.0, rng.uniform(0.1, 2.0), n)
  b = a + rng.normal(0.5, 0.1, n)                    # paired: shares a's spread
  mean, se = metrics.mean_and_se(a)
  np.testing.assert_allclose(mean, np.mean(a), rtol=1e-12)
  np.testing.assert_allclose(se, np.std(a, ddof=1) / np.sqrt(n), rtol=1e-12)
  np.testing.assert_allclose(metrics.paired_se(a, b), np.std(a - b, ddof=1) / np.sqrt(n),
                             rtol=1e-12)
  one_mean, one_se = metrics.mean_and_se(a[:1])
  assert one_mean == a[0] and math.isnan(one_se)
  assert math.isnan(metrics.paired_se(a[:1], b[:1]))
  with pytest.raises(ValueError, match="paired values"):
    metrics.paired_se(a, b[:-1])


def test_image_quality_is_per_image_psnr_and_ssim_on_the_unit_range(rng):
  clean, noisy = _image_pair(rng, (3, 24, 24, 3), 1.0)
  x, ref = 2 * noisy - 1, 2 * clean - 1            # the models' [-1, 1]
  out = metrics.image_quality(jnp.asarray(x), jnp.asarray(ref))
  psnr = [peak_signal_noise_ratio(c, n, data_range=1.0) for c, n in zip(clean, noisy)]
  ssim = [structural_similarity(c, n, data_range=1.0, channel_axis=-1) for c, n in zip(clean, noisy)]
  np.testing.assert_allclose([out["psnr"], out["psnr_std"]], [np.mean(psnr), np.std(psnr)], rtol=1e-4)
  np.testing.assert_allclose([out["ssim"], out["ssim_std"]], [np.mean(ssim), np.std(ssim)], rtol=1e-4, atol=1e-6)
  assert metrics.image_quality(jnp.asarray(ref), jnp.asarray(ref), psnr_cap=55.0)["psnr"] == 55.0


def test_interleaved_latencies_alternate_and_take_the_minimum(monkeypatch):
  durations = {"a": [9, 3, 5, 4], "b": [9, 2, 2, 7], "c": [9, 6, 1, 8]}   # the first call compiles
  calls, now = [], [0.0]

  def call(arg):
    calls.append(arg)
    now[0] += durations[arg][calls.count(arg) - 1]

  monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
  out = metrics.interleaved_latencies(call, ["a", "b", "c"], runs=3)
  # One compiling round, then three interleaved ones in alternating directions.
  assert calls == ["a", "b", "c"] * 2 + ["c", "b", "a"] + ["a", "b", "c"]
  assert out == [3, 2, 1]


# NIQE references from BasicSR's own implementation: basicsr 1.4.2 (pip install basicsr==1.4.2 in a
# throwaway venv, with torch 2.14.1+cu130 run on the CPU, torchvision 0.29.1, numpy 2.4.6, scipy 1.17.1,
# opencv-python 5.1.0.95, scikit-image 0.26.0, Python 3.11.7), printed with repr() from
#   from basicsr.metrics.niqe import calculate_niqe
#   calculate_niqe(np.ascontiguousarray(rgb[..., ::-1]), crop_border, input_order="HWC", convert_to="y")
# i.e. the uint8 RGB image as cv2.imread's BGR (camera3: skimage.data.camera() repeated to 3 channels),
# and calculate_niqe(data.camera(), 0, input_order="HW") for the grey one. Importing basicsr 1.4.2 with
# torchvision >= 0.17 needs sys.modules["torchvision.transforms.functional_tensor"] aliased to a module
# holding torchvision.transforms.functional.rgb_to_grayscale (its data package imports it); the
# metrics do not use it.
_NIQE_BASICSR = [
    ("astronaut", 0, 3.0649476661847754),
    ("astronaut", 4, 2.9912960484545486),
    ("camera3", 0, 3.155215748805634),
    ("coffee", 0, 4.115241615372862),
    ("camera", 0, 3.096206619345783),
    ("coffee_96x192", 0, 13.141174559524423),       # two blocks
    # One block: BasicSR's np.cov of one row is NaN and np.linalg.pinv raises LinAlgError; this is its
    # calculate_niqe with niqe.py's np.cov replaced by MATLAB's nancov value there (zeros).
    ("astronaut_128x128", 0, 9.46425853180315),
]


def _sample(name: str) -> np.ndarray:
  crops = {"coffee_96x192": ("coffee", np.s_[:96, :192]),
           "astronaut_128x128": ("astronaut", np.s_[:128, :128])}
  base, crop = crops.get(name, (name, np.s_[:]))
  if base == "camera3":
    return np.repeat(data.camera()[..., None], 3, axis=-1)
  return getattr(data, base)()[crop]


@pytest.mark.parametrize("name,crop_border,expected", _NIQE_BASICSR)
def test_niqe_matches_basicsr(name, crop_border, expected):
  # Agreement is ~1e-5 but for photos with large saturated areas (astronaut 1e-4 to 2e-4, camera3
  # 3.3e-4): BasicSR's float32 (MKL) bicubic halving leaves last-bit noise there, see metrics.niqe.
  image = _sample(name)
  np.testing.assert_allclose(metrics.niqe(image, data_range=255, crop_border=crop_border), expected,
                             rtol=1e-3)


def test_niqe_takes_any_data_range_and_dtype():
  rgb = data.astronaut()[:200, :300]
  expected = metrics.niqe(rgb, data_range=255)
  # The luma is rounded to integers first, so [0, 1] floats and 16-bit data give the same number.
  assert metrics.niqe(rgb / 255.0, data_range=1.0) == expected
  assert metrics.niqe((rgb.astype(np.float32) / 255), data_range=1.0) == expected
  assert metrics.niqe(rgb.astype(np.uint16) * 257, data_range=65535) == expected
  grey = data.camera()[:200, :300]
  assert metrics.niqe(grey[..., None], data_range=255) == metrics.niqe(grey, data_range=255)


@pytest.mark.parametrize("name", ["astronaut", "camera", "coffee"])
def test_niqe_rises_with_blur(name):
  image = _sample(name).astype(np.float64)
  blur = lambda sigma: scipy.ndimage.gaussian_filter(image, (sigma, sigma) + (0,) * (image.ndim - 2))
  # Measured: astronaut 3.06, 5.41, 7.26; camera 3.10, 5.37, 8.04; coffee 4.12, 5.50, 8.16.
  scores = [metrics.niqe(x, data_range=255) for x in (image, blur(1.0), blur(2.0))]
  assert scores[0] + 1 < scores[1] and scores[1] + 1 < scores[2]


def test_niqe_rejects_bad_images():
  rgb = data.astronaut()[:100, :100]
  with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
    metrics.niqe(rgb[None], data_range=255)                     # a batch
  with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
    metrics.niqe(rgb[..., :2], data_range=255)
  with pytest.raises(TypeError, match="dtype"):
    metrics.niqe(rgb > 100, data_range=1)
  with pytest.raises(TypeError, match="dtype"):
    metrics.niqe(rgb.astype(np.complex64), data_range=255)
  with pytest.raises(ValueError, match="96 x 96"):
    metrics.niqe(data.astronaut()[:95, :300], data_range=255)
  with pytest.raises(ValueError, match="96 x 96"):
    metrics.niqe(rgb, data_range=255, crop_border=3)             # 94 x 94 left
  with pytest.raises(ValueError, match="crop_border"):
    metrics.niqe(rgb, data_range=255, crop_border=-1)
  with pytest.raises(ValueError, match=r"\[0, data_range = 1.0\]"):
    metrics.niqe(rgb, data_range=1.0)                            # a 0-255 image called as [0, 1]
  with pytest.raises(ValueError, match="finite"):
    metrics.niqe(np.where(rgb > 200, np.nan, rgb / 255), data_range=1.0)
  with pytest.raises(ValueError, match="undefined"):
    metrics.niqe(np.full((192, 192, 3), 0.5), data_range=1.0)


def test_niqe_parameters_come_from_basicsr_without_importing_it(monkeypatch, tmp_path):
  mu_F, cov_FxF = metrics.niqe_pristine_params()
  assert mu_F.shape == (36,) and cov_FxF.shape == (36, 36)
  np.testing.assert_allclose(cov_FxF, cov_FxF.T)
  assert "basicsr" not in sys.modules
  spec = metrics.importlib.util.find_spec("basicsr")
  with np.load(os.path.join(spec.submodule_search_locations[0], "metrics", "niqe_pris_params.npz")) as f:
    # The window the MSCN uses is the one BasicSR ships: 7 x 7, sigma 7 / 6.
    np.testing.assert_allclose(metrics._gaussian_window(), f["gaussian_window"], rtol=0, atol=1e-16)
  for found in (None, types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])):
    monkeypatch.setattr(metrics, "importlib",
                        types.SimpleNamespace(util=types.SimpleNamespace(find_spec=lambda name: found)))
    metrics.niqe_pristine_params.cache_clear()
    try:
      with pytest.raises(FileNotFoundError, match="make venv.*pip install --no-deps basicsr==1.4.2"):
        metrics.niqe(data.astronaut()[:96, :96], data_range=255)
    finally:
      metrics.niqe_pristine_params.cache_clear()


@pytest.mark.parametrize("factor", [1, 2, 3, 4])
def test_bicubic_resize_keeps_planes_and_constants(factor, rng):
  h, w = (int(n) for n in rng.integers(5, 9, 2))
  i, j = np.meshgrid(np.arange(factor * h), np.arange(factor * w), indexing="ij")
  a, b, c = rng.uniform(-1, 1, 3)
  plane = (a + b * i + c * j)[None, :, :, None]
  got = metrics.bicubic_resize(np.concatenate([plane, np.full_like(plane, a)], -1), (h, w))
  assert got.shape == (1, h, w, 2)
  np.testing.assert_allclose(got[..., 1], a, rtol=1e-12)         # rows sum to 1, also at the borders
  # A cubic kernel stretched by an integer factor still reproduces linear functions, so away from the
  # mirrored border (the kernel spans 2 factor input pixels each side of its centre) the output is
  # the plane at the output pixels' centres, (k + 1/2) factor - 1/2 in input pixels.
  centre = (np.arange(h) + 0.5) * factor - 0.5
  inner = slice(2, h - 2)
  expected = a + b * centre[:, None] + c * ((np.arange(w) + 0.5) * factor - 0.5)[None, :]
  np.testing.assert_allclose(got[0, inner, 2:w - 2, 0], expected[inner, 2:w - 2], rtol=0, atol=1e-12)
  if factor == 1:
    np.testing.assert_allclose(got[..., 0], plane[..., 0], rtol=0, atol=1e-12)


def _colour_pair(rng, shape):
  """Random RGB images in [0, 1] and noisy copies, each image with its own noise level."""
  a = rng.uniform(0, 1, shape)
  noise = rng.uniform(0.02, 0.3, (shape[0], 1, 1, 1))
  return a, np.clip(a + noise * rng.standard_normal(shape), 0, 1)


def test_ciede2000_matches_skimage_per_image(rng):
  a, b = _colour_pair(rng, (3, 6, 7, 3))
  got = metrics.ciede2000(a, b)
  assert got.shape == (3,)
  expected = [deltaE_ciede2000(rgb2lab(a[k]), rgb2lab(b[k])).mean() for k in range(3)]
  np.testing.assert_allclose(got, expected, rtol=1e-12)
  np.testing.assert_allclose(metrics.ciede2000(b, a), got, rtol=1e-12)        # symmetric
  np.testing.assert_array_equal(metrics.ciede2000(a, a), 0.0)
  assert (got > 0).all()


def test_colour_error_of_flat_colours(rng):
  # Constant images stay constant under the resize, so the error is the two colours' CIEDE2000.
  sr_colour, lr_colour = rng.uniform(0, 1, (2, 2, 1, 1, 3))
  factor = int(rng.integers(1, 5))
  sr = np.broadcast_to(sr_colour, (2, 4 * factor, 5 * factor, 3))
  lr = np.broadcast_to(lr_colour, (2, 4, 5, 3))
  expected = deltaE_ciede2000(rgb2lab(sr_colour[:, 0, 0]), rgb2lab(lr_colour[:, 0, 0]))
  np.testing.assert_allclose(metrics.colour_error(sr, lr), expected, rtol=1e-9)


def test_colour_error_is_zero_against_its_own_downsampling(rng):
  sr, _ = _colour_pair(rng, (2, 12, 16, 3))
  lr = np.clip(metrics.bicubic_resize(sr, (3, 4)), 0, 1)
  np.testing.assert_allclose(metrics.colour_error(sr, lr), 0.0, atol=1e-9)
  assert (metrics.colour_error(sr, np.clip(lr + 0.05, 0, 1)) > 0.5).all()
  np.testing.assert_array_equal(metrics.colour_error(sr, sr), 0.0)              # factor 1


def test_colour_metrics_reject_bad_shapes():
  x = np.zeros((2, 8, 8, 3))
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    metrics.ciede2000(x, x[:1])
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    metrics.ciede2000(x[0], x[0])
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    metrics.ciede2000(x[..., :1], x[..., :1])
  with pytest.raises(ValueError, match="lr"):
    metrics.colour_error(x[:, :4, :4], x)                         # LR larger than SR
  with pytest.raises(ValueError, match="lr"):
    metrics.colour_error(x, x[:1, :4, :4])                        # batch sizes differ
  with pytest.raises(ValueError, match="lr"):
    metrics.colour_error(x[..., :2], x[:, :4, :4, :2])


def test_clustered_se_against_a_slow_loop_and_the_binomial_case(rng):
  f = int(rng.integers(2, 30))
  n_F = rng.integers(1, 50, f)
  s_F = rng.binomial(n_F, rng.uniform(0.05, 0.95))
  p = s_F.sum() / n_F.sum()
  slow = 0.0
  for s, n in zip(s_F, n_F):            # the ratio estimator's linearised residual per cluster
    slow += (s - p * n) ** 2
  np.testing.assert_allclose(metrics.clustered_se(s_F, n_F),
                             np.sqrt(f / (f - 1) * slow) / n_F.sum(), rtol=1e-12)
  # One item per cluster: the binomial se with the small-sample factor.
  ones = rng.integers(0, 2, f)
  q = ones.mean()
  np.testing.assert_allclose(metrics.clustered_se(ones, np.ones(f)),
                             np.sqrt(q * (1 - q) / f * f / (f - 1)), rtol=1e-12, atol=1e-15)
  assert np.isnan(metrics.clustered_se([1], [3]))
