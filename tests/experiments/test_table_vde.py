"""The VDE table script end to end at the smoke preset, and its NFE-matching search on a known answer."""
import json

import numpy as np
import pytest

from experiments.tables import vde
from flowrl.cache import calibrate
from tests.experiments.smoke import run_table


@pytest.mark.slow
def test_vde_table_smoke_writes_finite_results(tmp_path, smoke_runs):
  out = run_table("vde", tmp_path, smoke_runs, ["digits_smoke", "image_crops_smoke"], timeout=900)
  for name in ("vde.md", "vde.json", "vde_psnr_nfe.png", "vde_teacache_coefficients.json"):
    assert (out / name).stat().st_size > 0, name
  result = json.loads((out / "vde.json").read_text())
  assert set(result["models"]) == set(vde.MODELS) == {"digits", "image_crops"}
  coefficients = json.loads((out / "vde_teacache_coefficients.json").read_text())
  steps = vde.SETTINGS["smoke"]["steps"]
  for name, block in result["models"].items():
    assert (tmp_path / "runs" / f"{name}_smoke").is_dir(), name
    rows = block["rows"]
    methods = {row["method"] for row in rows}
    assert {"VDE", "VDE-adaptive (ours)", "TeaCache", "EasyCache", "Euler, fewer steps"} <= methods
    assert rows[0]["nfe"] == steps
    for row in rows[1:]:
      assert 2 <= row["nfe"] < steps and row["speedup"] > 0, (name, row)
      assert np.isfinite([row["psnr"], row["ssim"], row["seconds"]]).all(), (name, row)
    assert len(block["teacache"]["coefficients"]) == 5
    assert coefficients[name] == block["teacache"]
  # digits is class-conditional with CFG, image_crops unconditional (one branch, no labels)
  digits, crops = result["models"]["digits"], result["models"]["image_crops"]
  assert digits["guided"] and digits["image_shape"] == [16, 16, 1]
  assert not crops["guided"] and crops["num_classes"] == 0 and crops["image_shape"] == [32, 32, 3]
  assert crops["teacache"]["cfg_scale"] == 1.0
  md = (out / "vde.md").read_text()
  sections = [md.index(f"## {vde.MODELS[name]['title']}") for name in ("digits", "image_crops")]
  assert sections[0] < sections[1]
  for part in (md[sections[0]:sections[1]], md[sections[1]:]):
    assert "| VDE | interval 5 |" in part and "Reading: at NFE" in part


def test_match_nfe_finds_the_smallest_setting_reaching_the_target():
  nfe_of = lambda p: 50 - 10 * np.log10(p / 1e-3)   # falls by 10 per decade from 50 at p = 1e-3
  tried_policies = []

  def mean_nfe(policy):
    tried_policies.append(policy)
    return float(np.floor(nfe_of(policy)))

  p, tried = calibrate.match_nfe(lambda p: p, 22, mean_nfe, iters=20)
  assert mean_nfe(p) <= 22 < mean_nfe(p * 0.999)
  assert [q for q, _ in tried] == tried_policies[:len(tried)]
