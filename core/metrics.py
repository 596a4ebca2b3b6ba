"""Evaluation measures the methods and their tables share.

Image quality (PSNR, SSIM, on RGB or on BT.601 luma; `image_quality` over a batch; the no-reference
NIQE; CIEDE2000 colour error, also against a low-resolution input), model cost (parameters, FLOPs,
interleaved latencies), distances between sample sets (energy distance, sliced W1, with bootstrap errors),
per-class diversity, where a curve first reaches a target, and standard errors (of a mean, of a
paired difference).

PSNR and SSIM match scikit-image's `peak_signal_noise_ratio` and `structural_similarity` defaults,
computed per image in JAX, in the inputs' float precision (float32 at least; float64 under x64).
NIQE (BasicSR's algorithm), the MATLAB-style bicubic resize and CIEDE2000 (scikit-image's) are
offline evaluation measures in numpy; they import scipy and scikit-image when first called.
"""
import functools
import importlib.util
import math
import os
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
  # A concrete (numpy) zero makes this reduce_window_sum, which JAX can differentiate under jit
  # (SSIM as a training loss); a traced jnp zero would give the generic, non-differentiable op.
  total = jax.lax.reduce_window(x_BxHxWxC, np.zeros((), x_BxHxWxC.dtype), jax.lax.add, window,
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


def mean_and_se(values_N) -> tuple[float, float]:
  """(mean, standard error of the mean) of N values: se = sample std (ddof=1) / sqrt(N), e.g. over
  seeds or test examples. se is nan for N < 2 (one value says nothing about the spread; nan, not 0,
  so a table cannot show a single run as exact); the mean is nan for N = 0."""
  values_N = np.asarray(values_N, np.float64).reshape(-1)
  n = len(values_N)
  mean = float(values_N.mean()) if n else float("nan")
  se = float(values_N.std(ddof=1) / math.sqrt(n)) if n >= 2 else float("nan")
  return mean, se


def paired_se(a_N, b_N) -> float:
  """The standard error of mean(a) - mean(b) for paired values a_N, b_N [N] (e.g. two methods on the
  same seeds or examples): the se of the per-pair differences, free of what the pairs share."""
  a_N, b_N = np.asarray(a_N, np.float64), np.asarray(b_N, np.float64)
  if a_N.shape != b_N.shape or a_N.ndim != 1:
    raise ValueError(f"paired values must both have shape [N]; got {a_N.shape} and {b_N.shape}")
  return mean_and_se(a_N - b_N)[1]


def clustered_se(successes_F, counts_F) -> float:
  """The standard error of the pooled rate p = sum(successes) / sum(counts) when the items come in F
  correlated clusters (e.g. the blocks of one file; successes may be differences of two methods'
  counts on the same items, for a paired difference): the ratio estimator's cluster-robust se,
  sqrt(F / (F - 1) * sum_f (s_f - p n_f)^2) / sum_f n_f. With one item per cluster it is the
  binomial sqrt(p (1 - p) / F) times sqrt(F / (F - 1)); nan for F < 2."""
  s_F, n_F = np.asarray(successes_F, np.float64), np.asarray(counts_F, np.float64)
  f = len(s_F)
  if f < 2:
    return float("nan")
  p = s_F.sum() / n_F.sum()
  return float(math.sqrt(f / (f - 1) * ((s_F - p * n_F) ** 2).sum()) / n_F.sum())


def image_quality_per_sample(x_BxHxWxC: jax.Array, reference_BxHxWxC: jax.Array, *,
                             psnr_cap: float = 100.0) -> tuple[np.ndarray, np.ndarray]:
  """(PSNR [B] (at most psnr_cap: identical images have infinite PSNR), SSIM [B]) against the
  reference, for images in [-1, 1] (clipped to it, then mapped to [0, 1])."""
  to01 = lambda x: jnp.clip((x + 1) / 2, 0.0, 1.0)
  a, b = to01(x_BxHxWxC), to01(reference_BxHxWxC)
  psnr_B = np.minimum(np.asarray(psnr(a, b, data_range=1.0), np.float64), psnr_cap)
  return psnr_B, np.asarray(ssim(a, b, data_range=1.0), np.float64)


def image_quality(x_BxHxWxC: jax.Array, reference_BxHxWxC: jax.Array, *,
                  psnr_cap: float = 100.0) -> dict[str, float]:
  """Mean and std over the batch of `image_quality_per_sample`'s PSNR and SSIM."""
  psnr_B, ssim_B = image_quality_per_sample(x_BxHxWxC, reference_BxHxWxC, psnr_cap=psnr_cap)
  return {"psnr": float(psnr_B.mean()), "psnr_std": float(psnr_B.std()),
          "ssim": float(ssim_B.mean()), "ssim_std": float(ssim_B.std())}


def _seconds(call: Callable[[Any], Any], arg: Any) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(call(arg))
  return time.perf_counter() - t0


def interleaved_latencies(call: Callable[[Any], Any], args: list, runs: int) -> list[float]:
  """The minimum seconds of call(arg) for each of args over `runs` rounds, each round calling every
  arg once, after a first (compiling) call of each. Interleaving exposes every arg to the same
  changes of machine load; the minimum is the run least disturbed by them. The rounds alternate
  direction (args, then args reversed), so that no arg always runs first or always follows the same
  neighbour."""
  for arg in args:
    _seconds(call, arg)
  times = [[0.0] * len(args) for _ in range(runs)]
  for r in range(runs):
    for i in (range(len(args)) if r % 2 == 0 else reversed(range(len(args)))):
      times[r][i] = _seconds(call, args[i])
  return [min(column) for column in zip(*times)]


# Resizing as MATLAB's imresize (the SR convention for making bicubic LR inputs, e.g. BasicSR's imresize)


def _cubic(x: np.ndarray) -> np.ndarray:
  """Keys' cubic convolution kernel with a = -0.5 (MATLAB's 'bicubic'), zero beyond |x| = 2."""
  ax = np.abs(x)
  return np.where(ax <= 1, 1.5 * ax ** 3 - 2.5 * ax ** 2 + 1,
                  np.where(ax <= 2, -0.5 * ax ** 3 + 2.5 * ax ** 2 - 4 * ax + 2, 0.0))


@functools.lru_cache(maxsize=8)
def _resize_matrix(in_len: int, out_len: int) -> np.ndarray:
  """[out_len, in_len] weights of MATLAB's imresize 'bicubic' with antialiasing along one axis.

  Output pixel k (1-based) samples input position u = k / s + (1 - 1 / s) / 2 for the scale
  s = out_len / in_len; when downsampling (s < 1) the kernel is stretched to width 4 / s and scaled
  by s (the antialiasing). Each row is normalised to sum 1, and taps outside the image fold back
  symmetrically (MATLAB's 'symmetric' padding: index -1 reads 0, in_len reads in_len - 1).
  """
  scale = out_len / in_len
  stretch = min(scale, 1.0)                  # 1: plain bicubic interpolation when upsampling
  width = 4.0 / stretch
  u_O = np.arange(1, out_len + 1) / scale + 0.5 * (1 - 1 / scale)
  taps = math.ceil(width) + 2
  index_OxT = np.floor(u_O - width / 2)[:, None] + np.arange(taps)        # 1-based
  weight_OxT = stretch * _cubic((u_O[:, None] - index_OxT) * stretch)
  weight_OxT /= weight_OxT.sum(axis=1, keepdims=True)
  index_OxT = index_OxT.astype(int) - 1
  index_OxT = np.where(index_OxT < 0, -index_OxT - 1, index_OxT)
  index_OxT = np.where(index_OxT >= in_len, 2 * in_len - 1 - index_OxT, index_OxT)
  if index_OxT.min() < 0 or index_OxT.max() >= in_len:
    raise ValueError(f"cannot resize a length of {in_len} to {out_len}: the kernel reaches past a "
                     f"mirrored copy of the image")
  matrix_OxI = np.zeros((out_len, in_len))
  np.add.at(matrix_OxI, (np.repeat(np.arange(out_len), taps), index_OxT.ravel()), weight_OxT.ravel())
  matrix_OxI.flags.writeable = False          # cached: shared by every caller
  return matrix_OxI


def bicubic_resize(x_BxHxWxC: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
  """MATLAB's imresize(x, [h w]) (bicubic, antialiased): [B, h, w, C] in float64, not clipped.

  Separable: the H axis, then the W axis, each with `_resize_matrix`. For integer factors
  s = H / h = W / w it is BasicSR's `imresize(x, 1 / s)` (its port of MATLAB's; float32 there:
  halving the 0-255 luma of skimage.data.astronaut() they differ by at most 4.6e-5).
  """
  x = np.asarray(x_BxHxWxC, np.float64)
  if x.ndim != 4:
    raise ValueError(f"images must have shape [B, H, W, C]; got {x.shape}")
  h, w = (int(n) for n in size_hw)
  if h < 1 or w < 1:
    raise ValueError(f"the output size must be positive; got {size_hw}")
  out = np.einsum("oh,bhwc->bowc", _resize_matrix(x.shape[1], h), x)
  return np.einsum("pw,bowc->bopc", _resize_matrix(x.shape[2], w), out)


# No-reference quality: NIQE (Mittal, Soundararajan and Bovik 2013, "Making a 'completely blind' image
# quality analyzer"), computed as BasicSR 1.4.2's basicsr/metrics/niqe.py does. Lower is better.

NIQE_BLOCK = 96           # block side in pixels at the first scale (48 at the second), as MATLAB's niqe
_NIQE_SIGMA = 7 / 6       # the 7 x 7 Gaussian window of the local mean and deviation (MSCN)
_NIQE_PARAMS = os.path.join("metrics", "niqe_pris_params.npz")
_NIQE_INSTALL = "`make venv`, or `.venv/bin/python -m pip install --no-deps basicsr==1.4.2`"
# The products of neighbours NIQE fits: horizontal, vertical and the two diagonals (np.roll shifts
# within each block, wrapping around, as BasicSR).
_NIQE_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))


@functools.cache
def _aggd_grid() -> tuple[np.ndarray, np.ndarray]:
  """The AGGD shapes a fit chooses from, [9801], and their moment ratios
  Gamma(2/a)^2 / (Gamma(1/a) Gamma(3/a)), [9801]: BasicSR's and MATLAB's grid, 0.2 to 10 by 0.001."""
  from scipy.special import gamma
  alpha_A = np.arange(0.2, 10.001, 0.001)
  return alpha_A, gamma(2 / alpha_A) ** 2 / (gamma(1 / alpha_A) * gamma(3 / alpha_A))


def _gaussian_window(size: int = 7, sigma: float = _NIQE_SIGMA) -> np.ndarray:
  """The normalised size x size Gaussian (BasicSR ships the same one in the parameter file)."""
  r = np.arange(size) - (size - 1) / 2
  window = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma ** 2))
  return window / window.sum()


@functools.cache
def niqe_pristine_params() -> tuple[np.ndarray, np.ndarray]:
  """The pristine model's feature mean [36] and covariance [36, 36], from BasicSR's niqe_pris_params.npz.

  Finds the installed basicsr package without importing it (importing it needs torch); the file is
  MATLAB's modelparameters.mat (Mittal et al.'s fit to 125 pristine images) converted by BasicSR.
  """
  spec = importlib.util.find_spec("basicsr")
  locations = list(spec.submodule_search_locations or []) if spec is not None else []
  for location in locations:
    path = os.path.join(location, _NIQE_PARAMS)
    if os.path.isfile(path):
      with np.load(path) as params:
        mu_F, cov_FxF = params["mu_pris_param"].reshape(36), params["cov_pris_param"].reshape(36, 36)
      mu_F.flags.writeable = cov_FxF.flags.writeable = False     # cached: shared by every caller
      return mu_F, cov_FxF
  raise FileNotFoundError(f"NIQE needs basicsr/{_NIQE_PARAMS} from the basicsr 1.4.2 sdist "
                          f"(searched {locations or 'no installed basicsr package'}); install it with "
                          f"{_NIQE_INSTALL}")


def _aggd_fit(x_NxP: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Moment-matching AGGD fit of each row of x [N, P]: shape alpha, left and right scales [N] each.

  The shape is the grid point whose moment ratio lies nearest the row's
  r = mean(|x|)^2 / mean(x^2) corrected for the asymmetry g = RMS(x < 0) / RMS(x > 0) (Eq. 7's
  estimator); the left (right) scale is RMS(x < 0) (RMS(x > 0)) times sqrt(Gamma(1/a) / Gamma(3/a)).
  NaN scales for a row without negative or without positive values.
  """
  from scipy.special import gamma
  alpha_A, ratio_A = _aggd_grid()
  sq_NxP = x_NxP ** 2
  neg_NxP, pos_NxP = x_NxP < 0, x_NxP > 0
  with np.errstate(invalid="ignore", divide="ignore"):
    left_std_N = np.sqrt((sq_NxP * neg_NxP).sum(1) / neg_NxP.sum(1))
    right_std_N = np.sqrt((sq_NxP * pos_NxP).sum(1) / pos_NxP.sum(1))
    gamma_hat_N = left_std_N / right_std_N
    r_hat_N = np.abs(x_NxP).mean(1) ** 2 / sq_NxP.mean(1)
    r_norm_N = r_hat_N * (gamma_hat_N ** 3 + 1) * (gamma_hat_N + 1) / (gamma_hat_N ** 2 + 1) ** 2
  # BasicSR takes np.argmin((ratio - r_norm)^2) over the grid. The ratio grows strictly with alpha,
  # so that is one of the two grid points around r_norm, the smaller on a tie; and the first for a
  # NaN (or infinite) r_norm, as np.argmin returns there.
  hi_N = np.clip(np.searchsorted(ratio_A, r_norm_N), 1, len(ratio_A) - 1)
  lo_N = hi_N - 1
  with np.errstate(invalid="ignore"):
    nearer_hi_N = (ratio_A[hi_N] - r_norm_N) ** 2 < (ratio_A[lo_N] - r_norm_N) ** 2
  alpha_N = alpha_A[np.where(np.isfinite(r_norm_N), np.where(nearer_hi_N, hi_N, lo_N), 0)]
  to_scale_N = np.sqrt(gamma(1 / alpha_N) / gamma(3 / alpha_N))
  return alpha_N, left_std_N * to_scale_N, right_std_N * to_scale_N


def _niqe_block_features(y_HxW: np.ndarray, block: int) -> np.ndarray:
  """The 18 NIQE features [N, 18] of each block x block tile of y's MSCN coefficients, N tiles.

  MSCN (Eq. 1): (y - mu) / (sigma + 1) with mu, sigma the local Gaussian-weighted mean and deviation
  (edges replicated). Per tile: the AGGD shape and mean scale of the MSCN values (2), then for each of
  the 4 neighbour products the shape, mean (Eq. 8: (b_r - b_l) Gamma(2/a) / Gamma(1/a)), and the left
  and right scales (16).

  The MSCN is computed in float32, as BasicSR's (scipy.ndimage on its float32 image) and bit for bit
  equal to it: on flat (e.g. saturated) patches the coefficients are float32 rounding residue whose
  signs still decide which side's moments a pixel counts in, and float64 moved NIQE of
  skimage.data.astronaut() by 1.2%. The fits run in float64.
  """
  from scipy.ndimage import correlate
  from scipy.special import gamma
  y_HxW = y_HxW.astype(np.float32)
  window = _gaussian_window()
  mu = correlate(y_HxW, window, mode="nearest")
  var = correlate(y_HxW ** 2, window, mode="nearest") - mu ** 2
  mscn_HxW = ((y_HxW - mu) / (np.sqrt(np.abs(var)) + 1)).astype(np.float64)
  rows, cols = y_HxW.shape[0] // block, y_HxW.shape[1] // block
  tiles_NxBxB = (mscn_HxW[:rows * block, :cols * block].reshape(rows, block, cols, block)
                 .transpose(0, 2, 1, 3).reshape(rows * cols, block, block))
  n = rows * cols
  alpha, left, right = _aggd_fit(tiles_NxBxB.reshape(n, -1))
  features = [alpha, (left + right) / 2]
  for shift in _NIQE_SHIFTS:
    product_NxBxB = tiles_NxBxB * np.roll(tiles_NxBxB, shift, axis=(1, 2))
    alpha, left, right = _aggd_fit(product_NxBxB.reshape(n, -1))
    mean = (right - left) * gamma(2 / alpha) / gamma(1 / alpha)
    features += [alpha, mean, left, right]
  return np.stack(features, axis=1)


def _niqe_luma(image: np.ndarray, data_range: float) -> np.ndarray:
  """The [H, W] plane NIQE scores, on a 0-255 scale and rounded to integers, as BasicSR.

  RGB [H, W, 3]: BT.601 luma (BasicSR's to_y_channel, i.e. bgr2ycbcr(y_only=True), on the channels
  reversed), with its float32 roundings so that the rounding to integers agrees; [H, W] or [H, W, 1]
  (grey or luma already): the values themselves.
  """
  image_255 = image.astype(np.float32) * np.float32(255.0 / data_range)
  if image.ndim == 3 and image.shape[2] == 3:
    rgb01 = image_255 / np.float32(255.0)
    y01 = ((rgb01 @ np.asarray(_Y_FROM_RGB)) + _Y_OFFSET) / 255.0
    image_255 = y01.astype(np.float32) * np.float32(255.0)
  return np.round(image_255.reshape(image.shape[:2])).astype(np.float64)


def niqe(image: np.ndarray, *, data_range: float, crop_border: int = 0) -> float:
  """NIQE of one image (lower is more natural): RGB [H, W, 3], or grey / luma [H, W] or [H, W, 1],
  with values in [0, data_range] (any real dtype).

  BasicSR 1.4.2's calculate_niqe(img, crop_border, input_order="HWC", convert_to="y") on the
  image as BGR on a 0-255 scale (RGB images) or input_order="HW" (single-channel ones): the BT.601
  luma Y rounded to integers, crop_border pixels dropped on each side, then cropped to whole
  96 x 96 blocks (NIQE_BLOCK); 18 features per block at scale 1 and 18 more at scale 2 (the Y plane
  halved by MATLAB's antialiased bicubic imresize, 48 x 48 blocks), 36 per block; their mean mu and
  covariance S (over the blocks without NaN features) give
  sqrt((mu_p - mu)^T pinv((S_p + S) / 2) (mu_p - mu)) against the pristine model (mu_p, S_p).
  BasicSR reproduces MATLAB's niqe: MATLAB R2021a 5.72957338 and BasicSR 5.7295763 on baboon.png.

  Agrees with BasicSR to ~1e-5 relative on most photos. On ones with large flat (saturated) areas
  the second scale differs by a few 1e-4 (skimage.data.camera() as RGB: 3.3e-4): BasicSR resizes in
  float32 (torch, MKL), whose last-bit noise on the flat areas sets signs of its MSCN coefficients
  there; here the resize is float64, so flat areas stay flat and the number is the same on every
  machine. One deviation: an image of a single block (H and W both below 192) has no sample
  covariance, and BasicSR's np.cov then gives NaN (and np.linalg.pinv a LinAlgError); here S = 0,
  as MATLAB's nancov gives for one observation.
  """
  image = np.asarray(image)
  if image.dtype.kind not in "uif":
    raise TypeError(f"niqe needs a real-valued (integer or float) image; got dtype {image.dtype}")
  if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3))):
    raise ValueError(f"niqe needs one image of shape [H, W, 3] (RGB), [H, W, 1] or [H, W]; "
                     f"got {image.shape}")
  if not data_range > 0:
    raise ValueError(f"data_range must be positive; got {data_range}")
  if crop_border < 0 or crop_border != int(crop_border):
    raise ValueError(f"crop_border must be a non-negative integer; got {crop_border}")
  crop_border = int(crop_border)
  height, width = image.shape[0] - 2 * crop_border, image.shape[1] - 2 * crop_border
  rows, cols = max(height, 0) // NIQE_BLOCK, max(width, 0) // NIQE_BLOCK
  if rows == 0 or cols == 0:
    raise ValueError(f"niqe needs at least {NIQE_BLOCK} x {NIQE_BLOCK} pixels (one block) after "
                     f"crop_border = {crop_border} on each side; got {image.shape[:2]} before it")
  if not np.all(np.isfinite(image)) or image.min() < 0 or image.max() > data_range:
    raise ValueError(f"niqe needs finite values in [0, data_range = {data_range}]; got "
                     f"[{image.min()}, {image.max()}]")
  y_HxW = _niqe_luma(image, data_range)
  y_HxW = y_HxW[crop_border:crop_border + rows * NIQE_BLOCK, crop_border:crop_border + cols * NIQE_BLOCK]
  half_HxW = bicubic_resize(y_HxW[None, :, :, None], (rows * NIQE_BLOCK // 2, cols * NIQE_BLOCK // 2))
  features_NxF = np.concatenate([_niqe_block_features(y_HxW, NIQE_BLOCK),
                                 _niqe_block_features(half_HxW[0, :, :, 0], NIQE_BLOCK // 2)], axis=1)
  complete_MxF = features_NxF[~np.isnan(features_NxF).any(axis=1)]
  if len(complete_MxF) == 0:
    raise ValueError("niqe is undefined for this image: every block has a NaN feature (MSCN "
                     "coefficients or neighbour products all of one sign: a flat image, e.g. constant)")
  mu_F = np.nanmean(features_NxF, axis=0)
  cov_FxF = (np.cov(complete_MxF, rowvar=False) if len(complete_MxF) > 1
             else np.zeros((features_NxF.shape[1],) * 2))
  mu_pristine_F, cov_pristine_FxF = niqe_pristine_params()
  diff_F = mu_pristine_F - mu_F
  return float(np.sqrt(diff_F @ np.linalg.pinv((cov_pristine_FxF + cov_FxF) / 2) @ diff_F))


# Colour error: CIEDE2000 (Sharma, Wu and Dalal 2005) in CIELAB, D65, as scikit-image computes it.


def ciede2000(a_BxHxWx3: np.ndarray, b_BxHxWx3: np.ndarray) -> np.ndarray:
  """Per-image mean CIEDE2000 colour difference [B] of sRGB images a, b [B, H, W, 3] in [0, 1].

  skimage.color.deltaE_ciede2000 (kL = kC = kH = 1) of skimage.color.rgb2lab (D65, 2 degree
  observer) per pixel, averaged over the pixels. 0 for identical images, symmetric; ~2.3 is a "just
  noticeable" difference.
  """
  from skimage.color import deltaE_ciede2000, rgb2lab
  a, b = np.asarray(a_BxHxWx3, np.float64), np.asarray(b_BxHxWx3, np.float64)
  if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
    raise ValueError(f"images must both have shape [B, H, W, 3]; got {a.shape} and {b.shape}")
  return deltaE_ciede2000(rgb2lab(a), rgb2lab(b), channel_axis=-1).mean(axis=(1, 2))


def colour_error(sr_BxHxWx3: np.ndarray, lr_Bxhxwx3: np.ndarray) -> np.ndarray:
  """Per-image mean CIEDE2000 [B] of the SR output, brought down to the LR size, against the LR input.

  PiD's colour error against the LR input: sr [B, H, W, 3] and lr [B, h, w, 3] are sRGB in [0, 1]
  with H >= h, W >= w (normally H = s h, W = s w). The SR output is downsampled with MATLAB's
  antialiased bicubic imresize (`bicubic_resize`: the cubic kernel stretched by the factor, the
  resize that makes bicubic LR inputs; not a box / area average), clipped to [0, 1], then scored
  with `ciede2000`.
  """
  sr, lr = np.asarray(sr_BxHxWx3, np.float64), np.asarray(lr_Bxhxwx3, np.float64)
  if (sr.ndim != 4 or lr.ndim != 4 or sr.shape[-1] != 3 or lr.shape[-1] != 3
      or sr.shape[0] != lr.shape[0] or sr.shape[1] < lr.shape[1] or sr.shape[2] < lr.shape[2]):
    raise ValueError(f"colour_error needs sr [B, H, W, 3] and lr [B, h, w, 3] with h <= H, w <= W; "
                     f"got {sr.shape} and {lr.shape}")
  down = np.clip(bicubic_resize(sr, lr.shape[1:3]), 0.0, 1.0)
  return ciede2000(down, lr)
