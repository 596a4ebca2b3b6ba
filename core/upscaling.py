"""What the upscaling CLIs of PiD (`decoders.upscale`) and SANA-SR (`sr.upscale`) share: large images
in overlapping tiles blended linearly across the overlaps, so memory stays bounded; one-line errors.

Tiles live on a grid of cells: an input i gives k_i pixels per cell along each axis (PiD: a latent
cell and its k x k noise pixels; SANA-SR: the LR pixels of one latent cell), the output out_k.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence

import numpy as np


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
  """Start offsets of tiles of `tile` cells covering `size` cells with at least `overlap` shared."""
  if size <= tile:
    return [0]
  n = math.ceil((size - overlap) / (tile - overlap))
  return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def ramp(length: int, overlap: int, start_open: bool, end_open: bool) -> np.ndarray:
  """Blend weights [length]: linear ramps over `overlap` pixels at the tile's inner edges."""
  w = np.ones(length, np.float32)
  if overlap:
    r = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
    if start_open:
      w[:overlap] = r
    if end_open:
      w[-overlap:] = np.minimum(w[-overlap:], r[::-1])
  return w


def tiled(fn: Callable, inputs: Sequence[tuple[np.ndarray, int]], grid_hw: tuple[int, int], tile: int,
          overlap: int, out_k: int, batch: int = 8,
          progress: Callable[[int, int], None] | None = None) -> np.ndarray:
  """fn(*input tiles) -> [n, t out_k, t out_k, C] over overlapping tiles of `tile` cells (`overlap`
  shared) of a grid_hw = (h, w) cell grid, blended linearly: returns [1, h out_k, w out_k, C].

  inputs: (array [1, h k, w k, c], k) pairs; each is cut into [n, t k, t k, c] tiles for fn.
  """
  h, w = grid_hw
  for a, k in inputs:
    if a.shape[1:3] != (h * k, w * k):
      raise ValueError(f"tiled: an input of shape {a.shape} is not {k} pixels a cell of the {h}x{w} grid")
  th, tw = min(tile, h), min(tile, w)
  boxes = [(i, j) for i in tile_starts(h, th, overlap) for j in tile_starts(w, tw, overlap)]
  out, weight = None, np.zeros((h * out_k, w * out_k, 1), np.float64)
  for first in range(0, len(boxes), batch):
    chunk = boxes[first:first + batch]
    tiles = [np.stack([a[0, i * k:(i + th) * k, j * k:(j + tw) * k] for i, j in chunk]) for a, k in inputs]
    for (i, j), y in zip(chunk, np.asarray(fn(*tiles))):
      if out is None:
        out = np.zeros((h * out_k, w * out_k, y.shape[-1]), np.float64)
      wy = ramp(th * out_k, overlap * out_k, i > 0, i + th < h)
      wx = ramp(tw * out_k, overlap * out_k, j > 0, j + tw < w)
      wgt = (wy[:, None] * wx[None, :])[..., None]
      out[i * out_k:(i + th) * out_k, j * out_k:(j + tw) * out_k] += wgt * y
      weight[i * out_k:(i + th) * out_k, j * out_k:(j + tw) * out_k] += wgt
    if progress:
      progress(min(first + batch, len(boxes)), len(boxes))
  return (out / weight)[None].astype(np.float32)


def pad_to(image_HxWx3: np.ndarray, unit: int) -> tuple[np.ndarray, bool]:
  """(uint8 image padded to multiples of `unit` by repeating its edge pixels, as floats in [-1, 1];
  whether it was padded)."""
  h, w = image_HxWx3.shape[:2]
  ph, pw = -(-h // unit) * unit, -(-w // unit) * unit
  x = np.pad(image_HxWx3, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
  return x.astype(np.float32) / 127.5 - 1, (ph, pw) != (h, w)


def to_uint8(y: np.ndarray) -> np.ndarray:
  """Images in [-1, 1] to uint8, rounded and clipped."""
  return np.clip(np.round((np.asarray(y) + 1) * 127.5), 0, 255).astype(np.uint8)


def read_rgb(path: str) -> np.ndarray:
  """The image file as uint8 RGB [H, W, 3]; `fail` naming it when Pillow cannot read it."""
  from PIL import Image, UnidentifiedImageError
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB"))
  except (OSError, UnidentifiedImageError) as e:
    fail(f"cannot read --input {path}: {e}")


def fail(message: str):
  """A command-line tool's one-line error: 'error: message' on stderr, exit status 2."""
  print(f"error: {message}", file=sys.stderr)
  raise SystemExit(2)


class Parser(argparse.ArgumentParser):
  """argparse with `fail`'s one line instead of the usage block."""

  def error(self, message):
    fail(f"{message} (see --help)")
