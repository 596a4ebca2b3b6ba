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


def _tensorboard_events(logdir):
  """Every Event proto in logdir's event files, in file order (TFRecord framing: length, crc, data,
  crc)."""
  import struct
  from tensorboardX.proto import event_pb2
  events = []
  for name in sorted(os.listdir(logdir)):
    data = open(os.path.join(logdir, name), "rb").read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[i + 12:i + 12 + n])
      events.append(event)
      i += 12 + n + 4
  return events


def test_resumed_writer_drops_rows_after_the_restored_step_and_purges_tensorboard(tmp_path):
  w = writers.MetricWriter(str(tmp_path))
  for step in range(1, 11):
    w.write(step, {"train/loss": 1.0 / step})
  w.close()
  w = writers.MetricWriter(str(tmp_path), resume_step=6)    # the run restarts from step 6's checkpoint
  for step in range(7, 9):
    w.write(step, {"train/loss": 2.0})
  w.close()
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == list(range(1, 9))
  assert [r["train/loss"] for r in rows[6:]] == [2.0, 2.0]
  # TensorBoard hides the first file's events from step 7 on once it reads the purge marker.
  events = _tensorboard_events(tmp_path / "tensorboard")
  purges = [e.step for e in events if e.HasField("session_log") and e.session_log.status == 1]
  assert purges == [7]
  assert sorted(e.step for e in events if e.HasField("summary")) == sorted([*range(1, 11), 7, 8])


def test_writer_logs_images_and_the_config_as_text(tmp_path, rng):
  import io
  import ml_collections
  config = ml_collections.ConfigDict({"model": {"width": int(rng.integers(1, 1000))}, "seed": 3})
  image = rng.integers(0, 256, size=(int(rng.integers(2, 40)), int(rng.integers(2, 40)), 3),
                       dtype=np.uint8)
  w = writers.MetricWriter(str(tmp_path), resume_step=0, config=config)
  w.write_images(5, {"sample/grid": image})
  with pytest.raises(ValueError, match=r"image 'bad' must be uint8 \[H, W, 1 or 3\], got float32"):
    w.write_images(5, {"bad": image.astype(np.float32)})
  w.close()
  values = [(e.step, v) for e in _tensorboard_events(tmp_path / "tensorboard")
            if e.HasField("summary") for v in e.summary.value]
  (step, img), = [(s, v) for s, v in values if v.tag == "sample/grid"]
  assert step == 5
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(img.image.encoded_image_string))), image)
  (text,) = [v for _, v in values if v.tag.startswith("config")]
  assert f'"width": {config.model.width}' in text.tensor.string_val[0].decode()
  # A resumed writer does not write the config again.
  writers.MetricWriter(str(tmp_path), resume_step=5, config=config).close()
  assert sum(v.tag.startswith("config") for e in _tensorboard_events(tmp_path / "tensorboard")
             if e.HasField("summary") for v in e.summary.value) == 1


def test_replace_atomically_leaves_no_partial_file(tmp_path):
  path = str(tmp_path / "x.npy")
  writers.replace_atomically(path, lambda p: np.save(p, np.arange(3)))
  np.testing.assert_array_equal(np.load(path), np.arange(3))
  def fail(p):
    open(p, "w").write("half")
    raise OSError("disk full")
  with pytest.raises(OSError):
    writers.replace_atomically(path, fail)
  np.testing.assert_array_equal(np.load(path), np.arange(3))     # the old file stands
  assert os.listdir(tmp_path) == ["x.npy"]


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
