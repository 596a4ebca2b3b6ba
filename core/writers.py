"""Run outputs: metrics (JSONL + TensorBoard), progress reporting, image grids.

Only process 0 writes; every other process gets no-op writers so call sites need no branches.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping

import jax
import numpy as np


def replace_atomically(path: str, write) -> None:
  """Calls write(tmp) for a temporary file next to `path` (same extension), then renames it to
  `path`: a reader, or a run killed midway, never sees a half-written file."""
  root, ext = os.path.splitext(path)
  tmp = f"{root}.tmp{ext}"
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):     # write failed: the old file (if any) stands
      os.remove(tmp)


class MetricWriter:
  """Appends `{"step": s, **metrics}` lines to `workdir/<filename>` and scalars to TensorBoard events
  under `workdir/<tensorboard>`; `write_images` adds images, and `config` (on a fresh start) is
  written once as TensorBoard text.

  resume_step: the step a resumed run restarts from. Rows logged after it (by the interrupted run,
  past its last checkpoint) are dropped from the JSONL file, and TensorBoard is told to purge its
  events from step resume_step + 1 on (`purge_step`), so neither holds a step twice.
  """

  def __init__(self, workdir: str, resume_step: int | None = None, config=None,
               filename: str = "metrics.jsonl", tensorboard: str = "tensorboard"):
    self._active = jax.process_index() == 0
    if not self._active:
      return
    from tensorboardX import SummaryWriter  # writes event files without TensorFlow
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, filename)
    if resume_step is not None and os.path.exists(path):
      with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
      replace_atomically(path, lambda tmp: open(tmp, "w").writelines(kept))
    self._jsonl = open(path, "a")
    # The suffix keeps a resumption within the same second from overwriting the last event file
    # (tensorboardX names files by the second).
    self._tb = SummaryWriter(os.path.join(workdir, tensorboard), filename_suffix=f".{time.time_ns()}",
                             purge_step=None if resume_step is None else resume_step + 1)
    if config is not None and not resume_step:
      # Markdown: four-space indentation makes TensorBoard show the JSON verbatim.
      text = "\n".join("    " + line for line in config.to_json_best_effort(indent=2).splitlines())
      self._tb.add_text("config", text, 0)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self._active or not metrics:
      return
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    for k, v in row.items():
      if k != "step":
        self._tb.add_scalar(k, v, step)

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """images: {name: uint8 [H, W, 1 | 3]} -> TensorBoard image events."""
    if not self._active:
      return
    for k, img in images.items():
      img = np.asarray(img)
      if img.ndim != 3 or img.shape[-1] not in (1, 3) or img.dtype != np.uint8:
        raise ValueError(f"image {k!r} must be uint8 [H, W, 1 or 3], got {img.dtype} {img.shape}")
      self._tb.add_image(k, img, step, dataformats="HWC")

  def close(self) -> None:
    if self._active:
      self._jsonl.close()
      self._tb.close()


def format_metrics(metrics: Mapping[str, float]) -> str:
  return " ".join(f"{k} {v:.4g}" for k, v in metrics.items())


class Progress:
  """A tqdm bar (ETA, and the latest logged means) on a terminal; a plain line per logged row
  otherwise. `update(step, means)` gets the means of the steps since the last row (what
  metrics.jsonl holds) at logging steps and None between them."""

  def __init__(self, start: int, total: int):
    self._start, self._total = start, total
    self._t0 = time.time()
    self._bar = None
    if jax.process_index() == 0 and sys.stderr.isatty():
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=start, dynamic_ncols=True, unit="step")

  def update(self, step: int, means: Mapping[str, float] | None) -> None:
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      if means:
        self._bar.set_postfix_str("mean " + format_metrics(means), refresh=False)
    elif jax.process_index() == 0 and means:
      rate = (step - self._start) / max(time.time() - self._t0, 1e-9)
      eta = (self._total - step) / rate if rate > 0 else math.inf
      print(f"step {step}/{self._total} mean since last row: {format_metrics(means)} | "
            f"{rate:.2f} steps/s ETA {eta:.0f}s", flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def image_grid(images_BxHxWxC: np.ndarray, *, ncol: int | None = None,
               value_range: tuple[float, float] = (-1.0, 1.0), scale: int = 1) -> np.ndarray:
  """Tiles a batch of images into one uint8 [H', W', C] grid (1-pixel white gaps), each image
  enlarged `scale` times by nearest neighbour; values are clipped to `value_range`."""
  x = np.asarray(images_BxHxWxC, np.float32)
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"images must be [B, H, W, 1 or 3], got shape {x.shape}")
  lo, hi = value_range
  x = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
  if scale > 1:
    x = x.repeat(scale, axis=1).repeat(scale, axis=2)
  b, h, w, c = x.shape
  ncol = ncol or int(math.ceil(math.sqrt(b)))
  nrow = int(math.ceil(b / ncol))
  grid = np.ones((nrow * (h + 1) + 1, ncol * (w + 1) + 1, c), np.float32)
  for i in range(b):
    r, col = divmod(i, ncol)
    grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = x[i]
  return (grid * 255 + 0.5).astype(np.uint8)


def save_image(image_HxWxC: np.ndarray, path: str) -> None:
  """Writes a uint8 [H, W, 1 | 3] image as a PNG."""
  from PIL import Image
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  Image.fromarray(image_HxWxC[..., 0] if image_HxWxC.shape[-1] == 1 else image_HxWxC).save(path)


def save_image_grid(images_BxHxWxC: np.ndarray, path: str, **grid_kwargs) -> np.ndarray:
  """`image_grid` saved as a PNG at `path`; returns the grid."""
  grid = image_grid(images_BxHxWxC, **grid_kwargs)
  save_image(grid, path)
  return grid


def save_sample(picture_HxWxC: np.ndarray, workdir: str, step: int) -> None:
  """A sample hook's picture as workdir/samples/step_<step>.png, written atomically by process 0."""
  import jax
  if jax.process_index() == 0:
    out = os.path.join(workdir, "samples", f"step_{step:07d}.png")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    replace_atomically(out, lambda p: save_image(picture_HxWxC, p))
