"""sr/degrade.py: the Real-ESRGAN kernels against their closed forms, resizing and filtering against
independent implementations, the noises' moments, and the pipeline's determinism and ranges."""
import numpy as np
import pytest
from scipy import ndimage

from sr import degrade

STAGE1, STAGE2 = degrade.REAL_ESRGAN


def _photo(rng, size=64):
  """A smooth random image in [0, 1] with some texture, [size, size, 3]."""
  low = rng.uniform(size=(size // 8, size // 8, 3))
  img = ndimage.zoom(low, (8, 8, 1), order=3)[:size, :size] + 0.05 * rng.normal(size=(size, size, 3))
  return np.clip(img, 0, 1)


def test_every_random_kernel_is_normalised_and_sized(rng):
  for stage in (STAGE1, STAGE2):
    for _ in range(30):
      k = degrade.random_blur_kernel(rng, stage)
      assert k.shape == (21, 21)
      np.testing.assert_allclose(k.sum(), 1.0, atol=1e-9)
      # Point-symmetric, so correlating (torch's conv2d) and convolving agree.
      np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-12)
  for _ in range(10):
    k = degrade.final_sinc_kernel(rng)
    np.testing.assert_allclose(k.sum(), 1.0, atol=1e-9)


def test_gaussian_family_against_closed_forms(rng):
  size = int(rng.choice([7, 11, 21]))
  s = rng.uniform(0.3, 3.0)
  ax = np.arange(size) - size // 2
  g = np.exp(-ax ** 2 / (2 * s ** 2))
  np.testing.assert_allclose(degrade.gaussian_family_kernel("iso", size, s, 9.0, 1.0),
                             np.outer(g, g) / np.outer(g, g).sum(), atol=1e-12)
  # Anisotropic with theta = 0: separable with the two sigmas (x along columns, y along rows).
  sx, sy = rng.uniform(0.3, 3.0, size=2)
  gx, gy = np.exp(-ax ** 2 / (2 * sx ** 2)), np.exp(-ax ** 2 / (2 * sy ** 2))
  np.testing.assert_allclose(degrade.gaussian_family_kernel("aniso", size, sx, sy, 0.0),
                             np.outer(gy, gx) / np.outer(gy, gx).sum(), atol=1e-12)
  # Rotating by pi / 2 swaps the axes; beta = 1 makes the generalised kernel the Gaussian one.
  np.testing.assert_allclose(degrade.gaussian_family_kernel("aniso", size, sx, sy, np.pi / 2),
                             degrade.gaussian_family_kernel("aniso", size, sy, sx, 0.0), atol=1e-12)
  np.testing.assert_allclose(degrade.gaussian_family_kernel("generalized_aniso", size, sx, sy, 0.3, 1.0),
                             degrade.gaussian_family_kernel("aniso", size, sx, sy, 0.3), atol=1e-12)
  r2 = ax[None] ** 2 + ax[:, None] ** 2
  beta = rng.uniform(1, 2)
  plateau = 1 / ((r2 / s ** 2) ** beta + 1)
  np.testing.assert_allclose(degrade.gaussian_family_kernel("plateau_iso", size, s, 1.0, 0.0, beta),
                             plateau / plateau.sum(), atol=1e-12)
  with pytest.raises(ValueError, match="kernel kind"):
    degrade.gaussian_family_kernel("box", 7, 1.0, 1.0, 0.0)


def test_sinc_kernel_is_a_low_pass_with_its_cutoff():
  """The circular low-pass's spectrum is ~1 well inside the cutoff and ~0 well outside it."""
  cutoff = np.pi / 2
  k = np.pad(degrade.sinc_kernel(cutoff, 21), 200)
  spectrum = np.abs(np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(k))))
  freq = np.fft.fftshift(np.fft.fftfreq(k.shape[0])) * 2 * np.pi
  radius = np.hypot(*np.meshgrid(freq, freq))
  assert np.abs(spectrum[radius < 0.6 * cutoff] - 1).max() < 0.15
  assert spectrum[(radius > 1.4 * cutoff) & (radius < np.pi)].max() < 0.15


def test_filter2d_matches_scipy_correlate_with_reflect_borders(rng):
  img = rng.uniform(size=(int(rng.integers(22, 40)), int(rng.integers(22, 40)), 3))
  k = rng.uniform(size=(int(rng.choice([3, 7, 21])),) * 2)
  want = np.stack([ndimage.correlate(img[..., c], k, mode="mirror") for c in range(3)], -1)
  np.testing.assert_allclose(degrade.filter2d(img, k), want, atol=1e-9)


@pytest.mark.parametrize("mode", degrade.RESIZE_MODES)
def test_resize_is_identity_at_the_same_size_and_keeps_constants(rng, mode):
  img = rng.uniform(size=(int(rng.integers(5, 30)), int(rng.integers(5, 30)), 3))
  np.testing.assert_allclose(degrade.resize(img, img.shape[:2], mode), img, atol=1e-12)
  hw = tuple(int(v) for v in rng.integers(3, 60, size=2))
  const = np.full(img.shape, rng.uniform())
  np.testing.assert_allclose(degrade.resize(const, hw, mode), np.full((*hw, 3), const[0, 0, 0]),
                             atol=1e-12)


def test_resize_against_closed_forms(rng):
  # Area at an integer factor: the block means.
  f = int(rng.integers(2, 5))
  img = rng.uniform(size=(4 * f, 6 * f, 3))
  blocks = img.reshape(4, f, 6, f, 3).mean((1, 3))
  np.testing.assert_allclose(degrade.resize(img, (4, 6), "area"), blocks, atol=1e-12)
  # Bilinear reproduces a linear ramp inside the borders at torch's source coordinate
  # (i + 0.5) n / m - 0.5.
  n, m = int(rng.integers(16, 40)), int(rng.integers(16, 40))
  a, b = rng.normal(size=2)
  ramp = np.broadcast_to((a * np.arange(n) + b)[:, None, None], (n, 5, 1))
  src = (np.arange(m) + 0.5) * n / m - 0.5
  inside = (src >= 0) & (src <= n - 1)
  out = degrade.resize(np.ascontiguousarray(ramp), (m, 5), "bilinear")[:, 0, 0]
  np.testing.assert_allclose(out[inside], a * src[inside] + b, atol=1e-9)
  # Bicubic 2x up: output 2i + 1 sits at source i + 1/4, so taps i-1..i+2 weigh Keys' cubic (a = -0.75,
  # which keeps constants but not ramps) at distances 1.25, 0.25, 0.75, 1.75.
  x = rng.normal(size=(8, 1, 1))
  up = degrade.resize(x, (16, 1), "bicubic")[:, 0, 0]
  cubic = lambda t: (np.where(t <= 1, (1.25 * t - 2.25) * t * t + 1,
                              ((-0.75 * t + 3.75) * t - 6) * t + 3))
  w = cubic(np.array([1.25, 0.25, 0.75, 1.75]))
  i = int(rng.integers(1, 6))
  np.testing.assert_allclose(up[2 * i + 1], w @ x[i - 1:i + 3, 0, 0], atol=1e-12)
  with pytest.raises(ValueError, match="resize mode"):
    degrade.resize(img, (2, 2), "lanczos")


def test_noises_have_their_moments(rng):
  img = np.full((200, 200, 3), rng.uniform(0.2, 0.8))
  sigma = rng.uniform(1, 30)
  noise = degrade.gaussian_noise(rng, img, sigma, gray=False) - img
  assert abs(noise.std() - sigma / 255) < 0.05 * sigma / 255 and abs(noise.mean()) < 0.01 * sigma / 255 + 1e-4
  gray = degrade.gaussian_noise(rng, img, sigma, gray=True) - img
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
  # Poisson: a constant image has one level, so v = 1 and the noise is scale * (Poisson(q) - q).
  scale = rng.uniform(0.05, 3)
  q = np.round(img[0, 0, 0] * 255) / 255
  p = degrade.poisson_noise(rng, img, scale, gray=False) - img
  assert abs(p.mean() - scale * (q - img[0, 0, 0])) < 0.03 * scale
  assert abs(p.std() - scale * np.sqrt(q)) < 0.05 * scale * np.sqrt(q)


def test_jpeg_quality_orders_the_error(rng):
  img = _photo(rng)
  err = {q: np.mean((degrade.jpeg(img, q) - img) ** 2) for q in (30, 95)}
  assert err[95] < err[30]
  out = degrade.jpeg(img, 60)
  assert out.shape == img.shape and np.allclose(out * 255, np.round(out * 255))


def test_usm_sharpens_edges_and_keeps_flat_images(rng):
  flat = np.full((40, 40, 3), rng.uniform())
  np.testing.assert_allclose(degrade.usm_sharp(flat), flat, atol=1e-12)
  step = np.zeros((64, 64, 3))
  step[:, 32:] = rng.uniform(0.3, 0.7)
  out = degrade.usm_sharp(step)
  assert out[:, 33].mean() > step[:, 33].mean()       # overshoot on the bright side of the edge
  assert 0 <= out.min() and out.max() <= 1


def test_degrade_is_reproducible_in_range_and_per_example(rng, seed):
  hr = np.stack([_photo(rng) for _ in range(3)]).astype(np.float32)
  a, b = degrade.degrade_batch(hr, seed), degrade.degrade_batch(hr, seed)
  np.testing.assert_array_equal(a["lr"], b["lr"])
  assert a["lr"].shape == (3, 16, 16, 3) and a["hr"].shape == hr.shape
  assert a["lr"].min() >= -1 and a["lr"].max() <= 1 and a["hr"].min() >= -1 and a["hr"].max() <= 1
  levels = (a["lr"] + 1) / 2 * 255
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)       # on the 8-bit grid
  alone, hr_usm = degrade.degrade(hr[1], np.random.default_rng([seed, 1]))
  np.testing.assert_allclose(a["lr"][1], alone * 2 - 1, atol=1e-6)
  np.testing.assert_allclose(a["hr"][1], degrade.usm_sharp(hr[1].astype(np.float64)) * 2 - 1, atol=1e-5)
  assert not np.array_equal(degrade.degrade_batch(hr, seed + 1)["lr"], a["lr"])
  # The LR still resembles the HR's downsampled content (degraded, not replaced). One image's
  # correlation falls below 0.3 in ~2% of draws (strong noise on a flat image), so the check takes
  # the median over 16 images: at least 8 of 16 below 0.3 has probability ~2e-10.
  hr16 = np.stack([_photo(rng) for _ in range(16)]).astype(np.float32)
  lr16 = degrade.degrade_batch(hr16, seed)["lr"]
  small = hr16.reshape(16, 16, 4, 16, 4, 3).mean((2, 4)) * 2 - 1
  assert np.median([np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in zip(lr16, small)]) > 0.3


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="multiple of the scale 4"):
    degrade.degrade(np.zeros((30, 32, 3)), np.random.default_rng(0))
  with pytest.raises(ValueError, match=r"float \[H, W, 3\]"):
    degrade.degrade(np.zeros((32, 32, 3), np.uint8), np.random.default_rng(0))
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    degrade.degrade_batch(np.zeros((32, 32, 3)), 0)
