"""core/upscaling.py: tiles cover the grid, and a tiled decode equals the whole-image decode away
from tile borders (for a decoder with a small receptive field); the CLI's one-line errors."""
import numpy as np
import pytest
from scipy import ndimage

from core import upscaling as upscale


@pytest.mark.parametrize("size, tile, overlap", [(5, 5, 1), (13, 4, 1), (32, 8, 2), (9, 4, 2)])
def test_tile_starts_cover_with_overlap(size, tile, overlap):
  starts = upscale.tile_starts(size, tile, overlap)
  assert starts[0] == 0 and starts[-1] + min(tile, size) == size
  for a, b in zip(starts, starts[1:]):
    assert 0 < b - a <= tile - overlap


def test_tiled_equals_whole_away_from_tile_borders(rng):
  k, r = 4, 2                  # 4 output pixels per latent cell; the decoder sees 2 pixels around
  latent = rng.normal(size=(1, 11, 14, 3)).astype(np.float32)
  noise = rng.normal(size=(1, 44, 56, 3)).astype(np.float32)

  def fn(lat, nse):            # a local decoder: nearest upsampling + noise, then a 5x5 box filter
    y = np.repeat(np.repeat(lat, k, 1), k, 2) + 0.3 * nse
    return ndimage.uniform_filter(y, size=(1, 2 * r + 1, 2 * r + 1, 1), mode="nearest")

  whole = fn(latent, noise)
  tiled = upscale.tiled(fn, [(latent, 1), (noise, k)], (11, 14), tile=6, overlap=2, out_k=k, batch=3)
  assert tiled.shape == whole.shape
  near = np.zeros(whole.shape[1:3], bool)       # within r pixels of an inner tile edge
  for axis, size in ((0, 11), (1, 14)):
    for s in upscale.tile_starts(size, 6, 2):
      for edge in (s * k, (s + 6) * k):
        if 0 < edge < size * k:
          sl = [slice(None)] * 2
          sl[axis] = slice(max(0, edge - r), edge + r)
          near[tuple(sl)] = True
  assert (~near).mean() > 0.3
  np.testing.assert_allclose(tiled[0][~near], whole[0][~near], rtol=1e-5, atol=1e-5)
  assert np.abs(tiled[0][near] - whole[0][near]).max() > 1e-3     # the borders do differ


def test_inputs_off_the_grid_and_bad_flags_are_one_line(capsys):
  with pytest.raises(ValueError, match="not 4 pixels a cell"):
    upscale.tiled(lambda x: x, [(np.zeros((1, 10, 12, 3)), 4)], (3, 3), tile=2, overlap=1, out_k=4)
  with pytest.raises(SystemExit) as e:
    upscale.Parser().parse_args(["--nope"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "see --help" in err and len(err.splitlines()) == 1
