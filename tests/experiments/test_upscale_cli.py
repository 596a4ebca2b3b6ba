"""python -m decoders.upscale on the shared smoke runs: any input size (padded and cropped back),
teacher and student, one clear line for each bad input."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.experiments.smoke import ROOT, cli_env

pytestmark = pytest.mark.slow


def _upscale(*args):
  return subprocess.run([sys.executable, "-m", "decoders.upscale", *map(str, args)], cwd=ROOT,
                        env=cli_env(), capture_output=True, text=True, timeout=600)


def test_upscale_cli(tmp_path, smoke_runs):
  teacher = smoke_runs.copy("pid_x4_smoke", tmp_path, with_needed=True)
  student = smoke_runs.copy("pid_dmd_smoke", tmp_path)
  image = np.random.default_rng(0).integers(0, 256, size=(21, 30, 3), dtype=np.uint8)
  Image.fromarray(image).save(tmp_path / "in.png")
  for run, out in ((teacher, "t.png"), (student, "s.png")):
    r = _upscale("--workdir", run, "--input", tmp_path / "in.png", "--output", tmp_path / out,
                 "--sigma", 0.3)
    assert r.returncode == 0, r.stderr[-3000:]
    assert Image.open(tmp_path / out).size == (120, 84)          # 4x, cropped back
    assert "padded" in r.stderr and "tiles" in r.stderr
  assert "4-step student" in r.stdout
  (tmp_path / "bad.png").write_bytes(b"not an image")
  for args, match in [
      (("--input", tmp_path / "bad.png"), "cannot read --input"),
      (("--input", tmp_path / "in.png", "--sigma", "1.5"), "--sigma must be in [0, 1)"),
      (("--input", tmp_path / "in.png", "--scale", "8"), "this run decodes at 4x"),
      (("--input", tmp_path / "in.png", "--bogus", "1"), "unrecognized arguments: --bogus"),
  ]:
    r = _upscale("--workdir", teacher, "--output", tmp_path / "x.png", *args)
    assert r.returncode == 2 and match in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
  r = _upscale("--workdir", tmp_path / "pid_backbone_smoke", "--input", tmp_path / "in.png",
               "--output", tmp_path / "x.png")
  assert r.returncode == 2 and "expected a pid run in adapter or full mode" in r.stderr
