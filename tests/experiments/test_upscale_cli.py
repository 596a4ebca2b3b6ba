"""decoders.upscale's command line on the shared smoke runs (in-process): any input size (padded and
cropped back), teacher and student runs, one clear line for each bad input."""
import numpy as np
import pytest
from PIL import Image

from decoders import upscale

pytestmark = pytest.mark.slow


def _upscale(capsys, *args) -> tuple[int, str, str]:
  try:
    upscale.main([str(a) for a in args])
    code = 0
  except SystemExit as e:
    code = e.code
  out = capsys.readouterr()
  return code, out.out, out.err


def test_upscale_cli(tmp_path, smoke_runs, capsys):
  teacher = smoke_runs.copy("pid_x4_smoke", tmp_path, with_needed=True)
  student = smoke_runs.copy("pid_dmd_smoke", tmp_path)
  image = np.random.default_rng(0).integers(0, 256, size=(21, 30, 3), dtype=np.uint8)
  Image.fromarray(image).save(tmp_path / "in.png")
  for run, out in ((teacher, "t.png"), (student, "s.png")):
    code, stdout, stderr = _upscale(capsys, "--workdir", run, "--input", tmp_path / "in.png",
                                    "--output", tmp_path / out, "--sigma", 0.3)
    assert code == 0, stderr[-3000:]
    assert Image.open(tmp_path / out).size == (120, 84)          # 4x, cropped back
    assert "padded" in stderr and "tiles" in stderr
  assert "4-step student" in stdout
  (tmp_path / "bad.png").write_bytes(b"not an image")
  for args, match in [
      (("--input", tmp_path / "bad.png"), "cannot read --input"),
      (("--input", tmp_path / "in.png", "--sigma", "1.5"), "--sigma must be in [0, 1)"),
      (("--input", tmp_path / "in.png", "--scale", "8"), "this run decodes at 4x"),
      (("--input", tmp_path / "in.png", "--bogus", "1"), "unrecognized arguments: --bogus"),
  ]:
    code, _, stderr = _upscale(capsys, "--workdir", teacher, "--output", tmp_path / "x.png", *args)
    assert code == 2 and match in stderr and len(stderr.strip().splitlines()) == 1, stderr
  code, _, stderr = _upscale(capsys, "--workdir", tmp_path / "pid_backbone_smoke", "--input",
                             tmp_path / "in.png", "--output", tmp_path / "x.png")
  assert code == 2 and "expected a pid run in adapter or full mode" in stderr


def test_sr_upscale_cli(tmp_path, smoke_runs, capsys):
  """sr.upscale: 4x of an odd-sized image in tiles (padded and cropped back), one line per bad input."""
  from sr import upscale as sr_upscale
  run = smoke_runs.copy("sana_sr_onestep_smoke", tmp_path, with_needed=True)
  image = np.random.default_rng(0).integers(0, 256, size=(21, 30, 3), dtype=np.uint8)
  Image.fromarray(image).save(tmp_path / "in.png")

  def cli(*args):
    try:
      sr_upscale.main([str(a) for a in args])
      code = 0
    except SystemExit as e:
      code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err

  code, stdout, stderr = cli("--workdir", run, "--input", tmp_path / "in.png", "--output",
                             tmp_path / "o.png", "--tile", 32, "--overlap", 16)
  assert code == 0, stderr[-3000:]
  assert Image.open(tmp_path / "o.png").size == (120, 84) and "padded" in stderr and "tile" in stderr
  (tmp_path / "bad.png").write_bytes(b"not an image")
  for args, match in [
      (("--workdir", run, "--input", tmp_path / "bad.png"), "cannot read --input"),
      (("--workdir", run, "--input", tmp_path / "in.png", "--tile", "0"), "--tile must be >= 1"),
      (("--workdir", tmp_path / "sana_sr_dcae_smoke", "--input", tmp_path / "in.png"), "expected an sr run"),
      (("--workdir", run, "--input", tmp_path / "in.png", "--bogus", "1"), "unrecognized arguments"),
  ]:
    code, _, stderr = cli(*args, "--output", tmp_path / "x.png")
    assert code == 2 and match in stderr and len(stderr.strip().splitlines()) == 1, stderr
