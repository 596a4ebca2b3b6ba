"""2-D samplers match their documented laws; the `two_d` builder stores them."""
import numpy as np
import pytest
from scipy import stats

import core.data
from core.data import pipeline
from core.data import two_d

# Every p-value assertion fires on ALPHA of the draws from the documented law (asymptotic KS and
# chi-square p-values; 1e-7 leaves room for their tail error), at most 3 per test, so a test fails
# by chance on well under 1e-6 of the draws. N = 40000 keeps the power N = 20000 had at 1e-4: the KS
# critical distance sqrt(ln(2 / ALPHA) / 2N) is 0.0145 (was 0.0157) and the chi-square one
# sqrt(chi2_7.isf(ALPHA) / N) is 0.034 (was 0.039).
ALPHA = 1e-7
N = 40000


def _ring_radius_cdf(r):
  return np.mean([stats.norm.cdf(r, loc=radius, scale=two_d.RING_STD)
                  for radius in two_d.RING_RADII], axis=0)


def _assert_double_ring(point_nx2):
  radius_n = np.linalg.norm(point_nx2, axis=1)
  assert stats.kstest(radius_n, _ring_radius_cdf).pvalue > ALPHA
  angle_n = np.arctan2(point_nx2[:, 1], point_nx2[:, 0])
  assert stats.kstest(angle_n, stats.uniform(-np.pi, 2 * np.pi).cdf).pvalue > ALPHA


@pytest.mark.parametrize('name', two_d.NAMES)
def test_sampler_shape_dtype_and_determinism(name, seed):
  a = core.data.sample_two_d(name, 100, np.random.default_rng(seed))
  b = core.data.sample_two_d(name, 100, np.random.default_rng(seed))
  assert a.shape == (100, 2) and a.dtype == np.float32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, core.data.sample_two_d(
      name, 100, np.random.default_rng(seed + 1)))


def test_double_ring_radii_and_angles(rng):
  _assert_double_ring(core.data.sample_two_d('double_ring', N, rng))


def test_gaussian_mixture_modes(rng):
  point_nx2 = core.data.sample_two_d('gaussian_mixture', N, rng)
  centre_kx2 = two_d.gmm_centres()
  np.testing.assert_allclose(np.linalg.norm(centre_kx2, axis=1), two_d.GMM_RADIUS)
  # Neighbouring centres are 1.53 = 15 GMM_STD apart: a point nearer another mode's centre is a
  # 7.6-sigma event, so the nearest centre is the point's own mode.
  mode_n = np.argmin(
      np.linalg.norm(point_nx2[:, None] - centre_kx2[None], axis=2), axis=1)
  counts = np.bincount(mode_n, minlength=two_d.GMM_NUM_MODES)
  assert stats.chisquare(counts).pvalue > ALPHA
  residual_nx2 = point_nx2 - centre_kx2[mode_n]
  # The sample std's relative s.e. is 1 / sqrt(2N) = 0.0035: 0.05 is 14 of them.
  np.testing.assert_allclose(residual_nx2.std(0), two_d.GMM_STD, rtol=0.05)
  assert stats.kstest(residual_nx2[:, 0] / two_d.GMM_STD, 'norm').pvalue > ALPHA


def test_checkerboard_cells(rng):
  point_nx2 = core.data.sample_two_d('checkerboard', N, rng)
  assert np.all(np.abs(point_nx2) <= 2)
  # Each point lies in the closure of one of the 8 black cells (corner (i, j), i + j even). Closed,
  # not floor(): rounding to float32 puts about 1 point in 10^7 exactly on the far edge of its cell,
  # where floor() names the white neighbour (0.2% of runs of N points failed that way).
  corner_kx2 = np.array([(i, j) for i in range(-2, 2) for j in range(-2, 2) if (i + j) % 2 == 0])
  inside_nxk = np.all((point_nx2[:, None] >= corner_kx2[None])
                      & (point_nx2[:, None] <= corner_kx2[None] + 1), axis=2)
  assert np.all(inside_nxk.any(1))
  cell_n = np.argmax(inside_nxk, axis=1)
  counts = np.bincount(cell_n, minlength=len(corner_kx2))
  assert len(counts) == 8 and np.all(counts > 0)
  assert stats.chisquare(counts).pvalue > ALPHA
  within_n = (point_nx2 - corner_kx2[cell_n]).ravel()
  assert stats.kstest(within_n, 'uniform').pvalue > ALPHA


def test_unknown_name_lists_choices():
  with pytest.raises(ValueError, match='double_ring'):
    core.data.sample_two_d('spiral', 10, np.random.default_rng(0))  # raises before any draw


def test_builder_stores_the_double_ring(data_dir):
  # The stored splits come from the builder's fixed seeds, so these p-values are fixed numbers.
  train = core.data.load('two_d', 'train', config='double_ring', data_dir=data_dir)
  assert len(train) == two_d.NUM_TRAIN
  first = train[0]['point']
  assert first.shape == (2,) and first.dtype == np.float32
  eval_point_nx2 = pipeline.InMemorySource(core.data.load(
      'two_d', 'eval', config='double_ring', data_dir=data_dir)).arrays['point']
  assert eval_point_nx2.shape == (two_d.NUM_EVAL, 2)
  assert eval_point_nx2.dtype == np.float32
  _assert_double_ring(eval_point_nx2)
  # Train and eval are different draws.
  assert not np.isin(first, eval_point_nx2).all()
