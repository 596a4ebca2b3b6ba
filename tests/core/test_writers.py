"""Run outputs: metrics JSONL + TensorBoard events, image grids."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from core import writers


def test_metric_writer_appends_jsonl_and_tensorboard(tmp_path):
  w = writers.MetricWriter(str(tmp_path))
  w.write(3, {"train/loss": np.float32(0.5), "lr": 1e-3})
  w.write(7, {"train/loss": 0.25})
  w.close()
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert rows == [{"step": 3, "train/loss": 0.5, "lr": 1e-3}, {"step": 7, "train/loss": 0.25}]
  events = os.listdir(tmp_path / "tensorboard")
  assert events and events[0].startswith("events.out.tfevents")


def test_image_grid_places_each_image(tmp_path, rng):
  x = rng.uniform(-1, 1, size=(5, 4, 6, 3)).astype(np.float32)
  writers.save_image_grid(x, str(tmp_path / "g.png"), ncol=3)
  grid = np.asarray(Image.open(tmp_path / "g.png"))
  assert grid.shape == (2 * 5 + 1, 3 * 7 + 1, 3)
  for i in range(5):
    r, c = divmod(i, 3)
    tile = grid[1 + r * 5:1 + r * 5 + 4, 1 + c * 7:1 + c * 7 + 6]
    np.testing.assert_array_equal(tile, ((x[i] + 1) / 2 * 255 + 0.5).astype(np.uint8))
  np.testing.assert_array_equal(grid[1 + 5:, 1 + 2 * 7:], 255)      # the unused sixth cell is blank
  with pytest.raises(ValueError, match=r"\[B, H, W, 1 or 3\]"):
    writers.save_image_grid(x[..., :2], str(tmp_path / "bad.png"))
