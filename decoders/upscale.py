"""Upscale an image with a trained PiD run: encode it with the run's autoencoder, decode the latent with
PiD at the run's scale (arXiv 2605.23902).

  python -m decoders.upscale --workdir RUN --input IMG --output IMG [--scale 4] [--steps 4] [--sigma 0.2]

RUN is a `pid` run (the teacher: Euler steps, default config.pid.sample_steps) or a `pid_distill` run
(the 4-step DMD2 student). Any input size: it is padded (edge pixels repeated) to a multiple of the
latent tile unit and the output cropped back, which is said. The latent is decoded in overlapping
tiles of --tile input pixels (default: the crop size the run was trained on) blended linearly across
the overlaps, so memory stays bounded; one noise image drawn for the whole output keeps tiles
consistent. A bad flag or an unreadable file gets one line on stderr and exit status 2.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from core import flow, train, upscaling
from decoders import distill, pid, task as pid_task


@dataclasses.dataclass
class Decoder:
  """A trained PiD ready to decode: latent [B, h, w, c] (+ sigma, noise) -> image [B, h k, w k, 3]."""
  model: pid.PiD
  params: dict
  encoder: object             # decoders.autoencoder.Frozen
  scale: int
  student: bool
  default_steps: int
  train_lr_size: int          # the LR crop size it was trained on
  shift: float

  @property
  def pixels_per_cell(self) -> int:
    """Output pixels per latent cell along each axis."""
    return self.encoder.factor * self.scale

  def decode(self, latent, sigma_B, noise, steps: int):
    """One batch of latents to images in [-1, 1] (unclipped)."""
    if self.student:
      x0_fn = lambda x, t: x - flow.time_like(t, x) * self.model.apply(
          {"params": self.params}, x, t, latent, sigma_B)
      return distill.student_sample(x0_fn, noise, jax.random.PRNGKey(0))
    grid = flow.time_grid(steps, shift=self.shift)
    return pid_task.decode(self.model, self.params, latent, sigma_B, noise, grid)


def load(workdir: str) -> Decoder:
  """The decoder of a finished `pid` (adapter / full mode) or `pid_distill` run."""
  params, config = train.restore_params(workdir)
  student = config.task == "pid_distill"
  if student:
    teacher_dir = distill.teacher_path(config, workdir)
    config = train.load_config(teacher_dir)
    params, run_dir = params["student"], teacher_dir
  elif config.task != "pid" or config.pid.mode not in ("adapter", "full"):
    mode = config.get("pid", {}).get("mode", "")
    raise ValueError(f"{workdir} holds a {config.task!r} run{f' (mode {mode!r})' if mode else ''}; "
                     "expected a pid run in adapter or full mode, or a pid_distill run")
  else:
    run_dir = workdir
  encoder = pid_task.load_encoder(config, run_dir)
  scale = int(config.pid.scale)
  return Decoder(model=pid_task.build_model(config), params=params, encoder=encoder, scale=scale,
                 student=student, default_steps=4 if student else int(config.pid.sample_steps),
                 train_lr_size=pid_task.hr_size(config) // scale,
                 shift=pid_task.pixel_shift(config, pid_task.hr_size(config)))


def upscale(decoder: Decoder, image: np.ndarray, *, steps: int | None = None, sigma: float = 0.2,
            tile: int | None = None, seed: int = 0, progress=None) -> tuple[np.ndarray, bool]:
  """uint8 RGB [H, W, 3] -> (uint8 [H s, W s, 3], whether the input was padded)."""
  f, k = decoder.encoder.factor, decoder.pixels_per_cell
  patch = decoder.model.backbone.patch_size
  # Latent tiles must map to whole patches: cells per tile a multiple of this.
  unit_cells = patch // math.gcd(patch, k)
  unit = f * unit_cells
  h, w = image.shape[:2]
  x, padded = upscaling.pad_to(image, unit)
  ph, pw = x.shape[:2]
  latent = np.asarray(jax.jit(decoder.encoder.encode)(jnp.asarray(x[None])))
  tile_px = tile or decoder.train_lr_size
  tile_cells = max(unit_cells, tile_px // f // unit_cells * unit_cells)
  overlap = min(tile_cells // 2, max(unit_cells, tile_cells // 4) // unit_cells * unit_cells)
  noise = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (1, ph * decoder.scale,
                                                                  pw * decoder.scale, 3)))
  steps = steps or decoder.default_steps
  fn = jax.jit(lambda z, n: decoder.decode(z, jnp.full((z.shape[0],), sigma), n, steps))
  y = upscaling.tiled(fn, [(latent, 1), (noise, k)], latent.shape[1:3], tile_cells, overlap, k,
                        progress=progress)
  y = y[0, :h * decoder.scale, :w * decoder.scale]
  return upscaling.to_uint8(y), padded


def main(argv: list[str] | None = None) -> None:
  parser = upscaling.Parser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a finished pid or pid_distill run")
  parser.add_argument("--input", required=True, help="the image to upscale (any format Pillow reads)")
  parser.add_argument("--output", required=True, help="where to write the result (PNG by extension)")
  parser.add_argument("--scale", type=int, default=None, help="must equal the run's scale (4 or 8)")
  parser.add_argument("--steps", type=int, default=None,
                      help="decoding steps (teacher default: its config; the student takes 4)")
  parser.add_argument("--sigma", type=float, default=0.2, help="sigma_lat the adapter is told")
  parser.add_argument("--tile", type=int, default=None, help="tile size in input pixels")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if not 0.0 <= args.sigma < 1.0:
    upscaling.fail(f"--sigma must be in [0, 1), got {args.sigma}")
  if args.steps is not None and args.steps < 1:
    upscaling.fail(f"--steps must be >= 1, got {args.steps}")
  image = upscaling.read_rgb(args.input)
  import experiments.tasks  # noqa: F401  (registers the tasks the run's config names)
  try:
    decoder = load(args.workdir)
  except (FileNotFoundError, ValueError) as e:
    upscaling.fail(f"--workdir {args.workdir}: {e}")
  if args.scale is not None and args.scale != decoder.scale:
    upscaling.fail(f"--scale {args.scale}: this run decodes at {decoder.scale}x (train another run for "
          f"{args.scale}x)")
  if decoder.student and args.steps not in (None, 4):
    upscaling.fail(f"--steps {args.steps}: the DMD2 student samples its fixed 4-step schedule")
  out, padded = upscale(decoder, image, steps=args.steps, sigma=args.sigma, tile=args.tile,
                        seed=args.seed,
                        progress=lambda i, n: print(f"\rtiles {i}/{n}", end="", file=sys.stderr))
  print(file=sys.stderr)
  if padded:
    print(f"input {image.shape[1]}x{image.shape[0]} padded to the tile unit and the output cropped "
          "back", file=sys.stderr)
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  from PIL import Image
  Image.fromarray(out).save(args.output)
  print(f"wrote {args.output}: {out.shape[1]}x{out.shape[0]} ({decoder.scale}x, sigma_lat "
        f"{args.sigma}, {'4-step student' if decoder.student else f'{args.steps or decoder.default_steps} steps'})")


if __name__ == "__main__":
  main()
