"""Evaluation measures the methods and their tables share.

Image quality (PSNR, SSIM, on RGB or on BT.601 luma; `image_quality` over a batch), model cost
(parameters, FLOPs, paired latencies), distances between sample sets (energy distance, sliced W1,
with bootstrap errors), per-class diversity, and where a curve first reaches a target.

PSNR and SSIM match scikit-image's `peak_signal_noise_ratio` and `structural_similarity` defaults,
computed per image in JAX, in the inputs' float precision (float32 at least; float64 under x64).
"""
import math
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

CHANNELS = ("rgb", "y")

# ITU-R BT.601 luma for RGB in [0, 1], giving Y in [16, 235] (studio swing), as SR papers and
# skimage.color.rgb2ycbcr compute it.
_Y_FROM_RGB = (65.481, 128.553, 24.966)
_Y_OFFSET = 16.0
# Y is then on an 8-bit scale, so PSNR-Y and SSIM-Y use a data range of 255 (the SR convention,
# e.g. BasicSR), not the 219 that the [16, 235] span would suggest.
Y_DATA_RANGE = 255.0


def _as_float(a, b) -> tuple[jax.Array, jax.Array]:
  """Promotes both images to a common float dtype, float32 at least."""
  dtype = jnp.result_type(a, b, jnp.float32)
  a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
  if a.shape != b.shape or a.ndim != 4:
    raise ValueError(f"images must both have shape [B, H, W, C]; got {a.shape} and {b.shape}")
  return a, b


def rgb_to_y(rgb: jax.Array, *, data_range: float = 1.0) -> jax.Array:
  """BT.601 luma Y = 16 + 65.481 R + 128.553 G + 24.966 B of RGB [..., 3] in [0, data_range].

  Returns [..., 1] in [16, 235] whatever data_range is (compare it with Y_DATA_RANGE = 255).
  """
  if jnp.shape(rgb)[-1:] != (3,):
    raise ValueError(f"rgb must have 3 channels last; got shape {jnp.shape(rgb)}")
  rgb = jnp.asarray(rgb, jnp.result_type(rgb, jnp.float32)) / data_range
  weights = jnp.asarray(_Y_FROM_RGB, rgb.dtype)
  return _Y_OFFSET + jnp.sum(rgb * weights, axis=-1, keepdims=True)


def _select_channel(a, b, channel: str, data_range: float):
  """Returns (a, b, data_range) on the requested channel set."""
  a, b = _as_float(a, b)
  if channel == "rgb":
    return a, b, data_range
  if channel == "y":
    return rgb_to_y(a, data_range=data_range), rgb_to_y(b, data_range=data_range), Y_DATA_RANGE
  raise ValueError(f"channel must be one of {CHANNELS}; got {channel!r}")


def psnr(a: jax.Array, b: jax.Array, *, data_range: float, channel: str = "rgb") -> jax.Array:
  """Per-image PSNR 10 log10(data_range^2 / MSE) in dB, [B] for a, b [B, H, W, C].

  channel "rgb": the MSE runs over every channel; "y": over the BT.601 luma of RGB images in
  [0, data_range], with data range Y_DATA_RANGE. Identical images give +inf.
  """
  a, b, data_range = _select_channel(a, b, channel, data_range)
  mse_B = jnp.mean((a - b) ** 2, axis=(1, 2, 3))
  return 10 * jnp.log10(data_range ** 2 / mse_B)


def _box_mean_valid(x_BxHxWxC: jax.Array, win_size: int) -> jax.Array:
  """Mean over every win_size x win_size window that lies inside the image: [B, H-w+1, W-w+1, C]."""
  window = (1, win_size, win_size, 1)
  total = jax.lax.reduce_window(x_BxHxWxC, jnp.zeros((), x_BxHxWxC.dtype), jax.lax.add, window,
                                (1, 1, 1, 1), "VALID")
  return total / win_size ** 2


def ssim(a: jax.Array, b: jax.Array, *, data_range: float, channel: str = "rgb", win_size: int = 7,
         k1: float = 0.01, k2: float = 0.03) -> jax.Array:
  """Per-image SSIM (Wang et al. 2004), [B] for a, b [B, H, W, C].

  Matches skimage.metrics.structural_similarity(..., data_range, channel_axis=-1) with its defaults:
  uniform win_size x win_size window, sample (co)variances (use_sample_covariance=True), K1, K2, and
  the mean of the SSIM map over pixels at least (win_size - 1) / 2 from the border, averaged over
  channels. skimage filters with reflect padding and then crops exactly the pixels whose window
  touches the padding, so a 'VALID' window mean gives the same numbers. channel "y" scores the
  BT.601 luma of RGB images in [0, data_range] instead, with data range Y_DATA_RANGE.
  """
  a, b, data_range = _select_channel(a, b, channel, data_range)
  if win_size % 2 != 1 or win_size > min(a.shape[1:3]):
    raise ValueError(f"win_size must be odd and at most min(H, W) = {min(a.shape[1:3])}; "
                     f"got {win_size}")
  mean = lambda x: _box_mean_valid(x, win_size)
  cov_norm = win_size ** 2 / (win_size ** 2 - 1)
  mu_a, mu_b = mean(a), mean(b)
  var_a = cov_norm * (mean(a * a) - mu_a ** 2)
  var_b = cov_norm * (mean(b * b) - mu_b ** 2)
  cov_ab = cov_norm * (mean(a * b) - mu_a * mu_b)
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov_ab + c2)
              / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
  return ssim_map.mean(axis=(1, 2, 3))


def param_count(params: Any) -> int:
  """Number of scalars in a parameter pytree (arrays, ShapeDtypeStructs, flax Partitioned boxes)."""
  return sum(math.prod(leaf.shape) if hasattr(leaf, "shape") else int(np.size(leaf))
             for leaf in jax.tree.leaves(params))


def flops(fn: Callable[..., Any], *args, **kwargs) -> dict[str, float]:
  """XLA's cost estimate of fn(*args, **kwargs): {"flops", "macs" = flops / 2, "bytes accessed"?}.

  Reads the LOWERED (pre-optimisation) HLO's cost analysis: the compiled executable's analysis on
  GPU leaves out convolutions dispatched to cuDNN. "bytes accessed" is included when XLA reports it.
  args and kwargs are traced, so bind static arguments (flags, configs) with functools.partial.
  """
  analysis = jax.jit(fn).lower(*args, **kwargs).cost_analysis()
  # Older jax returns one dict per computation in a list; newer a single dict; None if unsupported.
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    raise RuntimeError(f"XLA gave no FLOP count for this function on {jax.default_backend()}")
  result = {"flops": float(analysis["flops"]), "macs": float(analysis["flops"]) / 2}
  if "bytes accessed" in analysis:
    result["bytes accessed"] = float(analysis["bytes accessed"])
  return result


# Distances between sets of samples (e.g. a sampler's terminal points and held-out data)


@jax.jit
def _mean_distance(x_NxD: jax.Array, y_MxD: jax.Array) -> jax.Array:
  """Mean Euclidean distance over all N x M pairs of rows of x [N, D] and y [M, D]; a scalar."""
  # Summing the D coordinates one at a time keeps XLA's loop over the N x M pairs vectorised; a reduction
  # over a trailing axis of size 2 ran ~20x slower on CPU.
  sq_NxM = sum((x_NxD[:, None, d] - y_MxD[None, :, d]) ** 2 for d in range(x_NxD.shape[1]))
  return jnp.sqrt(sq_NxM).mean()


def energy_distance(x_NxD: np.ndarray, y_MxD: np.ndarray) -> float:
  """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| of two empirical sets (V-statistic, so >= 0)."""
  x, y = jnp.asarray(x_NxD, jnp.float32), jnp.asarray(y_MxD, jnp.float32)
  return float(2 * _mean_distance(x, y) - _mean_distance(x, x) - _mean_distance(y, y))


def sliced_w1(x_NxD: np.ndarray, y_NxD: np.ndarray, rng: np.random.Generator,
              num_projections: int = 128) -> float:
  """Sliced Wasserstein-1: the 1-D W1 of the two sets' projections, averaged over random unit directions.

  Between equal-size 1-D sets W1 is the mean gap between the sorted values, so N must equal for x and y.
  """
  if x_NxD.shape != y_NxD.shape:
    raise ValueError(f"sliced_w1 needs equal-size sets; got {x_NxD.shape} and {y_NxD.shape}")
  dirs_DxP = rng.standard_normal((x_NxD.shape[1], num_projections))
  dirs_DxP /= np.linalg.norm(dirs_DxP, axis=0)
  return float(np.abs(np.sort(x_NxD @ dirs_DxP, axis=0) - np.sort(y_NxD @ dirs_DxP, axis=0)).mean())


def bootstrap_distances(x_NxD: np.ndarray, y_NxD: np.ndarray, resamples: int, *, seed: int = 0,
                        num_projections: int = 128) -> dict[str, float]:
  """Energy distance ("energy") and sliced W1 ("sw1") of the full sets, each with its std over
  `resamples` bootstrap resamples of both ("energy_std", "sw1_std").

  The seed fixes the resamples and the random directions, so calls with the same seed and sizes
  compare every set on the same ones.
  """
  rng = np.random.default_rng(seed)
  fns = {"energy": energy_distance,
         "sw1": lambda x, y: sliced_w1(x, y, rng, num_projections=num_projections)}
  out = {}
  for name, fn in fns.items():
    out[name] = fn(x_NxD, y_NxD)
    boot = [fn(x_NxD[rng.integers(0, len(x_NxD), len(x_NxD))],
               y_NxD[rng.integers(0, len(y_NxD), len(y_NxD))]) for _ in range(resamples)]
    out[f"{name}_std"] = float(np.std(boot))
  return out


def class_diversity(x_NxHxWxC: np.ndarray, y_N: np.ndarray) -> float:
  """Mean over classes of the mean L2 distance between two distinct images of that class."""
  per_class = []
  for c in np.unique(y_N):
    flat_KxF = x_NxHxWxC[y_N == c].reshape(int((y_N == c).sum()), -1)
    dist_KxK = np.sqrt(((flat_KxF[:, None] - flat_KxF[None]) ** 2).sum(-1))
    per_class.append(dist_KxK[np.triu_indices(len(flat_KxF), 1)].mean())
  return float(np.mean(per_class))


def first_crossing(xs, ys, target: float) -> float | None:
  """The x at which the curve (xs, ys), in the given order, first reaches ys >= target, linearly
  interpolated between the point before and the first point at or above it; None when it never does.

  E.g. iterations (or seconds) to a reward, or the NFE a sweep sorted by NFE needs for an accuracy.
  """
  for i, y in enumerate(ys):
    if y >= target:
      if i == 0:
        return float(xs[0])
      f = (target - ys[i - 1]) / (y - ys[i - 1])
      return float(xs[i - 1] + f * (xs[i] - xs[i - 1]))
  return None


def image_quality(x_BxHxWxC: jax.Array, reference_BxHxWxC: jax.Array, *,
                  psnr_cap: float = 100.0) -> dict[str, float]:
  """Mean and std over the batch of PSNR (at most psnr_cap: identical images have infinite PSNR) and
  SSIM against the reference, for images in [-1, 1] (clipped to it, then mapped to [0, 1])."""
  to01 = lambda x: jnp.clip((x + 1) / 2, 0.0, 1.0)
  a, b = to01(x_BxHxWxC), to01(reference_BxHxWxC)
  psnr_B = np.minimum(np.asarray(psnr(a, b, data_range=1.0)), psnr_cap)
  ssim_B = np.asarray(ssim(a, b, data_range=1.0))
  return {"psnr": float(psnr_B.mean()), "psnr_std": float(psnr_B.std()),
          "ssim": float(ssim_B.mean()), "ssim_std": float(ssim_B.std())}


def paired_latencies(call: Callable[[Any], Any], a: Any, b: Any, repeats: int) -> tuple[float, float]:
  """Median seconds of call(a) and of call(b) over `repeats` alternating pairs, after a first
  (compiling) call of each: alternation exposes both to the same changes of machine load."""
  def seconds(arg):
    t0 = time.perf_counter()
    jax.block_until_ready(call(arg))
    return time.perf_counter() - t0

  seconds(a), seconds(b)
  pairs = [(seconds(a), seconds(b)) for _ in range(repeats)]
  return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
