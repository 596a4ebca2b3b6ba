"""Real-ESRGAN's second-order degradation (arXiv 2107.10833 Sec. 3), the training data of SANA-SR.

The pipeline and its ranges are those of Real-ESRGAN's `options/train_realesrnet_x4plus.yml` as the
design doc sana_sr.md ("Corrections and additions") reads them, on an HR image in [0, 1]:

  hr_usm = USM(hr)                                    the target, unsharp-masked (BasicSR's usm_sharp)
  stage 1: blur (sinc with p 0.1, else a random Gaussian-family kernel) -> resize up / down / keep
           -> Gaussian (p 0.5) or Poisson noise, grey with p 0.4 -> clip -> JPEG
  stage 2: blur with p 0.8 -> resize relative to the final size -> noise -> clip
  final:   50/50 [resize to H/s x W/s, sinc (p 0.8)] then JPEG, or JPEG then [resize, sinc]
           -> rounded to 8 bits.

Every random choice is drawn from the `numpy.random.Generator` passed in, so `degrade_batch(hr, seed)`
is reproducible; Real-ESRGAN draws the resize, noise-type and final-order choices once per batch on
the GPU, we draw them per image (the same distribution for each image). Resizing follows
`torch.nn.functional.interpolate` (area = adaptive average pooling; bilinear and bicubic with
align_corners=False, a = -0.75, no antialiasing), blurring `filter2D` (reflect padding), JPEG goes
through Pillow (Real-ESRGAN's DiffJPEG is a differentiable re-implementation of the same codec).
Runs on the host in numpy/scipy: `python -m sr.degrade` measures its throughput.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import time

import numpy as np
from PIL import Image
from scipy import ndimage, special

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")
MAX_KERNEL = 21       # every kernel is zero-padded to 21 x 21, as Real-ESRGAN's dataset does


@dataclasses.dataclass(frozen=True)
class Stage:
  """One degradation stage's ranges (uniform draws between the two ends)."""
  blur_prob: float
  kernel_prob: tuple[float, ...]           # over KERNEL_TYPES
  blur_sigma: tuple[float, float]
  betag: tuple[float, float]               # generalised Gaussian shape
  betap: tuple[float, float]               # plateau shape
  sinc_prob: float
  resize_prob: tuple[float, float, float]  # up, down, keep
  resize_range: tuple[float, float]        # (down's lower end, up's upper end)
  gaussian_noise_prob: float
  noise_range: tuple[float, float]         # Gaussian sigma, in 8-bit levels
  poisson_scale_range: tuple[float, float]
  gray_noise_prob: float
  jpeg_range: tuple[float, float]


KERNEL_PROB = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
REAL_ESRGAN = (
    Stage(1.0, KERNEL_PROB, (0.2, 3.0), (0.5, 4.0), (1.0, 2.0), 0.1, (0.2, 0.7, 0.1), (0.15, 1.5),
          0.5, (1.0, 30.0), (0.05, 3.0), 0.4, (30.0, 95.0)),
    Stage(0.8, KERNEL_PROB, (0.2, 1.5), (0.5, 4.0), (1.0, 2.0), 0.1, (0.3, 0.4, 0.3), (0.3, 1.2),
          0.5, (1.0, 25.0), (0.05, 2.5), 0.4, (30.0, 95.0)),
)
FINAL_SINC_PROB = 0.8


def _check_image(img: np.ndarray, name: str = "image") -> None:
  if img.ndim != 3 or img.shape[-1] not in (1, 3) or not np.issubdtype(img.dtype, np.floating):
    raise ValueError(f"{name} must be a float [H, W, 3] (or [H, W, 1]) array in [0, 1]; got "
                     f"{img.dtype} {img.shape}")


# ---------------------------------------------------------------------------------------------------
# Kernels (BasicSR's basicsr/data/degradations.py)
# ---------------------------------------------------------------------------------------------------

def _grid(size: int) -> np.ndarray:
  """[size, size, 2] (x, y) offsets from the centre of an odd kernel."""
  ax = np.arange(-(size // 2), size // 2 + 1, dtype=np.float64)
  xx, yy = np.meshgrid(ax, ax)
  return np.stack([xx, yy], -1)


def _quadratic_form(size: int, sig_x: float, sig_y: float, theta: float) -> np.ndarray:
  """d^T Sigma^-1 d over the kernel grid, Sigma = R diag(sig_x^2, sig_y^2) R^T rotated by theta."""
  rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
  inv = np.linalg.inv(rot @ np.diag([sig_x ** 2, sig_y ** 2]) @ rot.T)
  d = _grid(size)
  return np.einsum("...i,ij,...j->...", d, inv, d)


def gaussian_family_kernel(kind: str, size: int, sig_x: float, sig_y: float, theta: float,
                           beta: float = 1.0) -> np.ndarray:
  """A normalised [size, size] kernel: Gaussian exp(-q / 2), generalised Gaussian exp(-q^beta / 2) or
  plateau 1 / (q^beta + 1) of the quadratic form q (iso kinds: sig_y = sig_x, theta = 0)."""
  if kind not in KERNEL_TYPES:
    raise ValueError(f"kernel kind must be one of {KERNEL_TYPES}, got {kind!r}")
  if kind.endswith("iso") and not kind.endswith("aniso"):
    sig_y, theta = sig_x, 0.0
  q = _quadratic_form(size, sig_x, sig_y, theta)
  if kind.startswith("generalized"):
    k = np.exp(-0.5 * q ** beta)
  elif kind.startswith("plateau"):
    k = 1.0 / (q ** beta + 1.0)
  else:
    k = np.exp(-0.5 * q)
  return k / k.sum()


def sinc_kernel(cutoff: float, size: int) -> np.ndarray:
  """The circular low-pass (2-D sinc) kernel with cutoff omega_c in (0, pi], normalised."""
  c = (size - 1) / 2
  r = np.hypot(*np.meshgrid(np.arange(size) - c, np.arange(size) - c))
  with np.errstate(divide="ignore", invalid="ignore"):
    k = cutoff * special.j1(cutoff * r) / (2 * np.pi * r)
  k[r == 0] = cutoff ** 2 / (4 * np.pi)
  return k / k.sum()


def pad_kernel(k: np.ndarray, size: int = MAX_KERNEL) -> np.ndarray:
  p = (size - k.shape[0]) // 2
  return np.pad(k, p)


def _beta(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
  """BasicSR's shape draw: U[lo, 1] or U[1, hi] with probability 1/2 each."""
  return rng.uniform(lo_hi[0], 1.0) if rng.uniform() < 0.5 else rng.uniform(1.0, lo_hi[1])


def random_blur_kernel(rng: np.random.Generator, stage: Stage) -> np.ndarray:
  """One stage's blur kernel [21, 21]: odd size in 7..21; sinc (cutoff U[pi/3, pi] below size 13,
  U[pi/5, pi] from 13) with stage.sinc_prob, else a Gaussian-family kernel of stage's ranges."""
  size = int(rng.choice(np.arange(7, MAX_KERNEL + 1, 2)))
  if rng.uniform() < stage.sinc_prob:
    low = np.pi / 3 if size < 13 else np.pi / 5
    return pad_kernel(sinc_kernel(rng.uniform(low, np.pi), size))
  kind = KERNEL_TYPES[int(rng.choice(len(KERNEL_TYPES), p=stage.kernel_prob))]
  sig_x, sig_y = rng.uniform(*stage.blur_sigma), rng.uniform(*stage.blur_sigma)
  theta = rng.uniform(-np.pi, np.pi)
  beta = (_beta(rng, stage.betag) if kind.startswith("generalized") else
          _beta(rng, stage.betap) if kind.startswith("plateau") else 1.0)
  return pad_kernel(gaussian_family_kernel(kind, size, sig_x, sig_y, theta, beta))


def final_sinc_kernel(rng: np.random.Generator) -> np.ndarray:
  """The final stage's sinc (p 0.8, cutoff U[pi/3, pi]) or the identity pulse, [21, 21]."""
  if rng.uniform() < FINAL_SINC_PROB:
    return pad_kernel(sinc_kernel(rng.uniform(np.pi / 3, np.pi), int(rng.choice(np.arange(7, 22, 2)))))
  pulse = np.zeros((MAX_KERNEL, MAX_KERNEL))
  pulse[MAX_KERNEL // 2, MAX_KERNEL // 2] = 1.0
  return pulse


# ---------------------------------------------------------------------------------------------------
# Image operations
# ---------------------------------------------------------------------------------------------------

def filter2d(img_HxWxC: np.ndarray, kernel_KxK: np.ndarray) -> np.ndarray:
  """Correlation with an odd kernel under reflect padding (Real-ESRGAN's filter2D), same size."""
  from scipy import signal  # here: scipy.signal imports scipy.stats (~1 s), and every CLI start
  # imports this module through experiments.tasks
  p = kernel_KxK.shape[0] // 2
  padded = np.pad(img_HxWxC, ((p, p), (p, p), (0, 0)), mode="reflect")
  return signal.fftconvolve(padded, kernel_KxK[::-1, ::-1, None], mode="valid", axes=(0, 1))


@functools.lru_cache(maxsize=512)
def _resize_matrix(n_in: int, n_out: int, mode: str) -> np.ndarray:
  """[n_out, n_in] weights of one axis of torch's interpolate (align_corners=False); cached (the
  training pipeline asks for the same few sizes again and again), so read-only."""
  w = _resize_weights(n_in, n_out, mode)
  w.flags.writeable = False
  return w


def _resize_weights(n_in: int, n_out: int, mode: str) -> np.ndarray:
  w = np.zeros((n_out, n_in))
  if mode == "area":                    # adaptive_avg_pool: the bins [floor(i n/m), ceil((i+1) n/m))
    for i in range(n_out):
      lo, hi = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
      w[i, lo:hi] = 1.0 / (hi - lo)
    return w
  src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
  if mode == "bilinear":
    src = np.maximum(src, 0.0)
    lo = np.minimum(np.floor(src).astype(int), n_in - 1)
    frac = src - lo
    hi = np.minimum(lo + 1, n_in - 1)
    np.add.at(w, (np.arange(n_out), lo), 1 - frac)
    np.add.at(w, (np.arange(n_out), hi), frac)
    return w
  if mode == "bicubic":                 # Keys' cubic, a = -0.75; taps clamped to the border
    a = -0.75
    def cubic(x):
      x = np.abs(x)
      return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                      np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))
    base = np.floor(src).astype(int)
    for tap in range(-1, 3):
      idx = np.clip(base + tap, 0, n_in - 1)
      np.add.at(w, (np.arange(n_out), idx), cubic(src - (base + tap)))
    return w
  raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")


def resize(img_HxWxC: np.ndarray, hw: tuple[int, int], mode: str) -> np.ndarray:
  """torch.nn.functional.interpolate(img, size=hw, mode) for an [H, W, C] image."""
  if min(hw) < 1:
    raise ValueError(f"resize target must be at least 1 x 1, got {hw}")
  if mode not in RESIZE_MODES:
    raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
  wh, ww = _resize_matrix(img_HxWxC.shape[0], hw[0], mode), _resize_matrix(img_HxWxC.shape[1], hw[1], mode)
  h, w, c = img_HxWxC.shape
  rows = (wh @ img_HxWxC.reshape(h, w * c)).reshape(hw[0], w, c)      # two matmuls: separable
  return np.tensordot(rows, ww, axes=([1], [1])).transpose(0, 2, 1)


def _gray(img_HxWxC: np.ndarray) -> np.ndarray:
  """ITU-R 601 luma [H, W, 1] (torchvision's rgb_to_grayscale)."""
  return img_HxWxC @ np.array([0.299, 0.587, 0.114])[:, None]


def gaussian_noise(rng: np.random.Generator, img: np.ndarray, sigma: float, gray: bool) -> np.ndarray:
  """img + N(0, (sigma / 255)^2), one draw shared by the channels when gray."""
  shape = (*img.shape[:2], 1) if gray else img.shape
  return img + rng.normal(size=shape) * (sigma / 255.0)


def poisson_noise(rng: np.random.Generator, img: np.ndarray, scale: float, gray: bool) -> np.ndarray:
  """img + scale * (Poisson(img * v) / v - img) with v the distinct 8-bit levels rounded up to a power
  of 2 (BasicSR's add_poisson_noise), on the luma when gray."""
  src = _gray(img) if gray else img
  q = np.clip(np.round(src * 255.0), 0, 255) / 255.0
  vals = 2 ** math.ceil(math.log2(max(len(np.unique(q)), 1)))
  return img + scale * (rng.poisson(q * vals) / vals - q)


def jpeg(img: np.ndarray, quality: float) -> np.ndarray:
  """JPEG round trip through Pillow (4:2:0 chroma subsampling, Pillow's default) at int(quality)."""
  u8 = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(u8.squeeze(-1) if u8.shape[-1] == 1 else u8).save(buf, "JPEG", quality=int(quality))
  out = np.asarray(Image.open(buf), np.float64) / 255.0
  return out.reshape(img.shape)


def usm_sharp(img: np.ndarray, weight: float = 0.5, radius: int = 50, threshold: float = 10) -> np.ndarray:
  """BasicSR's unsharp mask: img + weight * (img - blur) where |img - blur| > threshold / 255, softened.

  The blur is OpenCV's GaussianBlur of an odd size `radius` (51) with its default sigma
  0.3 ((size - 1) / 2 - 1) + 0.8 and reflect-101 borders, applied to the image and to the mask."""
  size = radius + 1 if radius % 2 == 0 else radius
  sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
  ax = np.arange(size) - (size - 1) / 2
  g = np.exp(-ax ** 2 / (2 * sigma ** 2))
  g /= g.sum()
  # The 2-D Gaussian is separable: two 1-D passes ("mirror" is filter2d's reflect-101 padding)
  # cost 2 x 51 taps a pixel instead of an FFT convolution with the 51 x 51 kernel.
  blur = lambda x: ndimage.correlate1d(ndimage.correlate1d(x, g, axis=0, mode="mirror"), g, axis=1,
                                       mode="mirror")
  residual = img - blur(img)
  soft = blur((np.abs(residual) * 255 > threshold).astype(np.float64))
  return soft * np.clip(img + weight * residual, 0, 1) + (1 - soft) * img


# ---------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------

def _random_resize(rng, img, stage: Stage, ref_hw: tuple[int, int]) -> np.ndarray:
  """Scale ref_hw by U[1, hi] (up), U[lo, 1] (down) or 1, with a random mode."""
  kind = int(rng.choice(3, p=stage.resize_prob))
  scale = (rng.uniform(1.0, stage.resize_range[1]) if kind == 0 else
           rng.uniform(stage.resize_range[0], 1.0) if kind == 1 else 1.0)
  mode = RESIZE_MODES[int(rng.integers(3))]
  return resize(img, (max(1, int(ref_hw[0] * scale)), max(1, int(ref_hw[1] * scale))), mode)


def _random_noise(rng, img, stage: Stage) -> np.ndarray:
  gray = rng.uniform() < stage.gray_noise_prob
  if rng.uniform() < stage.gaussian_noise_prob:
    return gaussian_noise(rng, img, rng.uniform(*stage.noise_range), gray)
  return poisson_noise(rng, img, rng.uniform(*stage.poisson_scale_range), gray)


def degrade(hr_HxWx3: np.ndarray, rng: np.random.Generator, scale: int = 4,
            stages: tuple[Stage, Stage] = REAL_ESRGAN) -> tuple[np.ndarray, np.ndarray]:
  """(LR [H/scale, W/scale, 3] on the 8-bit grid, USM-sharpened HR target [H, W, 3]), both in [0, 1].

  Args:
    hr_HxWx3: float HR image in [0, 1], H and W multiples of scale.
    rng: the source of every random choice.
    scale: the SR factor (Real-ESRGAN: 4).
    stages: the two stages' ranges (default Real-ESRGAN x4plus; `ADCSR` the milder AdcSR settings).
  """
  _check_image(hr_HxWx3, "hr_HxWx3")
  h, w = hr_HxWx3.shape[:2]
  if h % scale or w % scale:
    raise ValueError(f"the HR image's size {(h, w)} must be a multiple of the scale {scale}")
  hr = usm_sharp(hr_HxWx3.astype(np.float64))
  final_hw = (h // scale, w // scale)
  s1, s2 = stages
  out = filter2d(hr, random_blur_kernel(rng, s1))
  out = _random_resize(rng, out, s1, out.shape[:2])
  out = np.clip(_random_noise(rng, out, s1), 0, 1)
  out = jpeg(out, rng.uniform(*s1.jpeg_range))
  if rng.uniform() < s2.blur_prob:
    out = filter2d(out, random_blur_kernel(rng, s2))
  out = _random_resize(rng, out, s2, final_hw)       # relative to the final size, as released
  out = np.clip(_random_noise(rng, out, s2), 0, 1)
  sinc, quality = final_sinc_kernel(rng), rng.uniform(*s2.jpeg_range)
  mode = RESIZE_MODES[int(rng.integers(3))]
  if rng.uniform() < 0.5:
    out = jpeg(np.clip(filter2d(resize(out, final_hw, mode), sinc), 0, 1), quality)
  else:
    out = filter2d(resize(jpeg(out, quality), final_hw, mode), sinc)
  lr = np.clip(np.round(out * 255.0), 0, 255) / 255.0
  return lr.astype(np.float32), hr.astype(np.float32)


ADCSR = tuple(dataclasses.replace(s, noise_range=(1.0, 15.0), jpeg_range=(60.0, 95.0)) for s in REAL_ESRGAN)


def degrade_batch(hr_BxHxWx3: np.ndarray, seed: int, scale: int = 4,
                  stages: tuple[Stage, Stage] = REAL_ESRGAN) -> dict[str, np.ndarray]:
  """{"lr": [B, H/s, W/s, 3], "hr": [B, H, W, 3] (USM)} in [-1, 1] from uint8 or [0, 1] float HR
  images; image i uses numpy's Generator seeded with (seed, i), so any example is reproducible alone."""
  hr = np.asarray(hr_BxHxWx3)
  if hr.dtype == np.uint8:
    hr = hr.astype(np.float64) / 255.0
  if hr.ndim != 4:
    raise ValueError(f"hr_BxHxWx3 must be [B, H, W, 3]; got shape {hr.shape}")
  pairs = [degrade(x, np.random.default_rng([seed, i]), scale, stages) for i, x in enumerate(hr)]
  return {"lr": np.stack([p[0] for p in pairs]) * 2 - 1, "hr": np.stack([p[1] for p in pairs]) * 2 - 1}


def main() -> None:
  """Throughput on this machine: images per second at a few HR sizes, printed and as JSON."""
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="128,256,512")
  parser.add_argument("--images", type=int, default=32)
  parser.add_argument("--out", default=None, help="write the rows as JSON here")
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  rows = []
  for size in (int(s) for s in args.sizes.split(",")):
    hr = rng.uniform(size=(args.images, size, size, 3))
    degrade_batch(hr[:2], 0)
    start = time.perf_counter()
    degrade_batch(hr, 1)
    sec = time.perf_counter() - start
    rows.append({"hr_size": size, "images_per_s": args.images / sec, "ms_per_image": 1e3 * sec / args.images})
    print(f"HR {size:4d} px: {rows[-1]['images_per_s']:7.1f} images/s ({rows[-1]['ms_per_image']:.1f} ms each)")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"degrade_throughput": rows}, f, indent=2)


if __name__ == "__main__":
  main()
