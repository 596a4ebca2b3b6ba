"""4x super-resolution of any image with a trained SANA-SR run (arXiv 2605.23451).

  python -m sr.upscale --workdir RUN --input IMG --output IMG [--tile 512] [--overlap 64]

RUN is an `sr` run of any mode (one-step, pruned, encoder-free, or the multi-step baseline). The input
is padded (edge pixels repeated) to a multiple of the LR pixels of one latent cell and the output
cropped back, which is said. The image is super-resolved in overlapping tiles of --tile output pixels
(rounded to whole latent cells) blended linearly across --overlap output pixels, so memory stays
bounded whatever the image size; a progress bar counts the tiles. A bad flag or an unreadable file gets
one line on stderr and exit status 2.
"""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from core import upscaling


def upscale(model, params, image: np.ndarray, *, tile: int = 512, overlap: int = 64,
            progress=None) -> tuple[np.ndarray, bool]:
  """uint8 RGB [H, W, 3] -> (uint8 [H s, W s, 3], whether the input was padded). model, params: a
  loaded run (`sr.onestep.load`); tile and overlap in output pixels."""
  pf, out_k = model.pixel_factor, model.ae.factor
  h, w = image.shape[:2]
  x, padded = upscaling.pad_to(image, pf)
  ph, pw = x.shape[:2]
  cells = max(1, tile // out_k)
  overlap_cells = min(max(1, -(-overlap // out_k)), max(cells - 1, 0))
  fn = jax.jit(lambda lr: model(params, lr))
  y = upscaling.tiled(fn, [(x[None], pf)], (ph // pf, pw // pf), cells, overlap_cells, out_k,
                      progress=progress)
  y = y[0, :h * model.scale, :w * model.scale]
  return upscaling.to_uint8(y), padded


def main(argv: list[str] | None = None) -> None:
  parser = upscaling.Parser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a finished sr run")
  parser.add_argument("--input", required=True, help="the image to upscale (any format Pillow reads)")
  parser.add_argument("--output", required=True, help="where to write the result (format by extension)")
  parser.add_argument("--tile", type=int, default=512, help="tile size in output pixels")
  parser.add_argument("--overlap", type=int, default=64, help="tile overlap in output pixels")
  args = parser.parse_args(argv)
  if args.tile < 1 or args.overlap < 0:
    upscaling.fail(f"--tile must be >= 1 and --overlap >= 0, got {args.tile} and {args.overlap}")
  image = upscaling.read_rgb(args.input)
  import experiments.tasks  # noqa: F401  (registers the tasks the run's config names)
  from core import train
  from sr import onestep
  try:
    if train.load_config(args.workdir).task != "sr":
      raise ValueError(f"it holds a {train.load_config(args.workdir).task!r} run; expected an sr run")
    model, params, _ = onestep.load(args.workdir)
  except (FileNotFoundError, ValueError) as e:
    upscaling.fail(f"--workdir {args.workdir}: {e}")
  from tqdm import tqdm
  bar = tqdm(total=None, unit="tile", file=sys.stderr)

  def progress(done, total):
    bar.total = total
    bar.update(done - bar.n)

  out, padded = upscale(model, jax.tree.map(jnp.asarray, params), image, tile=args.tile,
                        overlap=args.overlap, progress=progress)
  bar.close()
  if padded:
    print(f"input {image.shape[1]}x{image.shape[0]} padded to a multiple of {model.pixel_factor} px "
          "and the output cropped back", file=sys.stderr)
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  from PIL import Image
  Image.fromarray(out).save(args.output)
  print(f"wrote {args.output}: {out.shape[1]}x{out.shape[0]} ({model.scale}x, {model.mode})")


if __name__ == "__main__":
  main()
