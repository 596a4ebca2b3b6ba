"""The VDE table script end to end at the smoke preset, and its NFE-matching search on a known answer."""
import json
import os
import subprocess
import sys

import numpy as np

from experiments.tables import vde

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_vde_table_smoke_writes_finite_results(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = tmp_path / "out"
  r = subprocess.run([sys.executable, "-m", "experiments.tables.vde", "--preset", "smoke",
                      "--runs", str(tmp_path / "runs"), "--out", str(out)],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  for name in ("vde.md", "vde.json", "vde_psnr_nfe.png", "vde_teacache_coefficients.json"):
    assert (out / name).stat().st_size > 0, name
  result = json.loads((out / "vde.json").read_text())
  rows = result["rows"]
  methods = {row["method"] for row in rows}
  assert {"VDE", "VDE-adaptive (ours)", "TeaCache", "EasyCache", "Euler, fewer steps"} <= methods
  steps = vde.SETTINGS["smoke"]["steps"]
  assert rows[0]["nfe"] == steps
  for row in rows[1:]:
    assert 2 <= row["nfe"] < steps and row["speedup"] > 0
    assert np.isfinite([row["psnr"], row["ssim"], row["seconds"]]).all()
  assert len(result["teacache"]["coefficients"]) == 5
  assert "| VDE | interval 5 |" in (out / "vde.md").read_text()


def test_match_nfe_finds_the_smallest_setting_reaching_the_target():
  nfe_of = lambda p: 50 - 10 * np.log10(p / 1e-3)   # falls by 10 per decade from 50 at p = 1e-3
  tried_policies = []

  def mean_nfe(policy):
    tried_policies.append(policy)
    return float(np.floor(nfe_of(policy)))

  p, tried = vde.match_nfe(lambda p: p, 22, mean_nfe, iters=20)
  assert mean_nfe(p) <= 22 < mean_nfe(p * 0.999)
  assert [q for q, _ in tried] == tried_policies[:len(tried)]
