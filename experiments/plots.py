"""What the table scripts' figures share: readable axes and labelled sample grids.

Figures use matplotlib's object API (no pyplot), so importing a table script leaves a notebook's
backend alone.
"""
from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from core import writers


def figure(ncols: int = 1, nrows: int = 1, *, size: tuple[float, float] = (5.0, 3.5)):
  """(Figure, axes array [nrows, ncols]) of panels `size` inches each."""
  fig = Figure(figsize=(size[0] * ncols, size[1] * nrows))
  FigureCanvasAgg(fig)
  axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False))
  return fig, axes


def readable(ax, *, min_span: tuple[float, float] = (0.0, 0.0)) -> None:
  """At most 6 plain ticks per axis (no offset notation like "+4.146e1"), and each axis at least
  `min_span` wide around its data, so that a curve whose points barely differ (a flat sweep) is
  drawn as flat instead of its float noise stretched over the panel."""
  for axis, span, (lo, hi) in ((ax.xaxis, min_span[0], ax.get_xlim()),
                               (ax.yaxis, min_span[1], ax.get_ylim())):
    axis.set_major_locator(MaxNLocator(6))
    if hi - lo < span:
      mid = (lo + hi) / 2
      (ax.set_xlim if axis is ax.xaxis else ax.set_ylim)(mid - span / 2, mid + span / 2)
  ax.ticklabel_format(useOffset=False, style="plain", axis="both")
  ax.grid(alpha=0.3)


def save(fig, path: str, dpi: int = 120) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=dpi, bbox_inches="tight")   # long row labels would be clipped otherwise


def sample_grid(images_NxHxWxC: np.ndarray, path: str, *, ncol: int, row_labels: list[str],
                title: str, ylabel: str, min_pixels: int = 64) -> None:
  """A grid of samples (one row per label, `ncol` per row) enlarged by nearest neighbour so each
  sample is >= min_pixels wide, with its rows labelled and a title; values in [-1, 1]."""
  h = images_NxHxWxC.shape[1]
  scale = max(1, -(-min_pixels // h))
  grid = writers.image_grid(images_NxHxWxC, ncol=ncol, scale=scale)
  cell = h * scale + 1
  fig = Figure(figsize=(grid.shape[1] / 100 + 1.2, grid.shape[0] / 100 + 0.8))
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", interpolation="nearest")
  ax.set_yticks([1 + cell * i + cell / 2 for i in range(len(row_labels))], row_labels)
  ax.set_xticks([])
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  save(fig, path, dpi=100)
