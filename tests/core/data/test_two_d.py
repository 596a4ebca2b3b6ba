"""2-D samplers match their documented laws; the `two_d` builder stores them."""
import numpy as np
import pytest
from scipy import stats

import core.data
from core.data import pipeline
from core.data import two_d

N = 20000


def _ring_radius_cdf(r):
  return np.mean([stats.norm.cdf(r, loc=radius, scale=two_d.RING_STD)
                  for radius in two_d.RING_RADII], axis=0)


def _assert_double_ring(point_nx2):
  radius_n = np.linalg.norm(point_nx2, axis=1)
  assert stats.kstest(radius_n, _ring_radius_cdf).pvalue > 1e-4
  angle_n = np.arctan2(point_nx2[:, 1], point_nx2[:, 0])
  assert stats.kstest(angle_n, stats.uniform(-np.pi, 2 * np.pi).cdf).pvalue > 1e-4


@pytest.mark.parametrize('name', two_d.NAMES)
def test_sampler_shape_dtype_and_determinism(name):
  seed = np.random.default_rng().integers(2**31)
  a = core.data.sample_two_d(name, 100, np.random.default_rng(seed))
  b = core.data.sample_two_d(name, 100, np.random.default_rng(seed))
  assert a.shape == (100, 2) and a.dtype == np.float32
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, core.data.sample_two_d(
      name, 100, np.random.default_rng(seed + 1)))


def test_double_ring_radii_and_angles():
  _assert_double_ring(core.data.sample_two_d('double_ring', N,
                                             np.random.default_rng()))


def test_gaussian_mixture_modes():
  point_nx2 = core.data.sample_two_d('gaussian_mixture', N, np.random.default_rng())
  centre_kx2 = two_d.gmm_centres()
  np.testing.assert_allclose(np.linalg.norm(centre_kx2, axis=1), two_d.GMM_RADIUS)
  mode_n = np.argmin(
      np.linalg.norm(point_nx2[:, None] - centre_kx2[None], axis=2), axis=1)
  counts = np.bincount(mode_n, minlength=two_d.GMM_NUM_MODES)
  assert stats.chisquare(counts).pvalue > 1e-4
  residual_nx2 = point_nx2 - centre_kx2[mode_n]
  np.testing.assert_allclose(residual_nx2.std(0), two_d.GMM_STD, rtol=0.05)
  assert stats.kstest(residual_nx2[:, 0] / two_d.GMM_STD, 'norm').pvalue > 1e-4


def test_checkerboard_cells():
  point_nx2 = core.data.sample_two_d('checkerboard', N, np.random.default_rng())
  assert np.all(np.abs(point_nx2) <= 2)
  cell_nx2 = np.floor(point_nx2).astype(int)
  assert np.all(cell_nx2.sum(1) % 2 == 0)
  _, counts = np.unique(cell_nx2, axis=0, return_counts=True)
  assert len(counts) == 8
  assert stats.chisquare(counts).pvalue > 1e-4
  within_n = (point_nx2 - cell_nx2).ravel()
  assert stats.kstest(within_n, 'uniform').pvalue > 1e-4


def test_unknown_name_lists_choices():
  with pytest.raises(ValueError, match='double_ring'):
    core.data.sample_two_d('spiral', 10, np.random.default_rng())


def test_builder_stores_the_double_ring(data_dir):
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
