"""experiments/tables/pid.py end to end at the smoke preset, on the session's shared PiD smoke runs."""
import json

import numpy as np
import pytest

from tests.experiments.smoke import run_table
from tests.experiments.test_tables import _numbers


@pytest.mark.slow
def test_pid_table_smoke_writes_its_report(tmp_path, smoke_runs):
  shared = ["pid_autoencoder_smoke", "pid_backbone_smoke", "pid_x4_smoke", "pid_dmd_smoke",
            "pid_latent_smoke"]
  out = run_table("pid", tmp_path, smoke_runs, shared, timeout=900)
  for name in ("pid.md", "pid.json", "pid_crops.png"):
    assert (out / name).stat().st_size > 0, name
  result = json.loads((out / "pid.json").read_text())
  assert np.all(np.isfinite(_numbers(result)))
  methods = [r["method"] for r in result["rows"]]
  assert methods[0] == "AE decode + bicubic" and any(m.startswith("cascade") for m in methods)
  assert any(m.startswith("PiD student, DMD2 4 steps") for m in methods)
  exits = result["early_exit"]
  saved = {r["sigma_exit"]: r["latent_nfe_saved"] for r in exits}
  assert saved[0.0] == 0 and saved[0.4] > 0
  # The finished latent decoded by PiD is the reference itself.
  full = next(r for r in exits if r["sigma_exit"] == 0.0 and r["decoder"].startswith("PiD"))
  assert full["psnr_vs_full"] == 100.0
  assert "| 4x | PiD teacher (2 steps, sigma_lat 0) |" in (out / "pid.md").read_text()
