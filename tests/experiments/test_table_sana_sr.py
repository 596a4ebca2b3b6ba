"""experiments/tables/sana_sr.py end to end at the smoke preset, on the session's shared SANA-SR smoke
runs (the table trains the pruned and encoder-free models from the one-step run)."""
import json

import numpy as np
import pytest

from tests.experiments.smoke import run_table
from tests.experiments.test_tables import _numbers


@pytest.mark.slow
def test_sana_sr_table_smoke_writes_its_report(tmp_path, smoke_runs):
  shared = ["sana_sr_dcae_smoke", "sana_sr_prior_smoke", "sana_sr_onestep_smoke"]
  out = run_table("sana_sr", tmp_path, smoke_runs, shared, timeout=900)
  for name in ("sana_sr.md", "sana_sr.json", "sana_sr_latency.png", "sana_sr_crops.png"):
    assert (out / name).stat().st_size > 0, name
  result = json.loads((out / "sana_sr.json").read_text())
  rows = {r["variant"]: r for r in result["rows"]}
  assert list(rows) == ["bicubic", "dcae_ceiling", "onestep", "pruned", "encoder_free"]
  assert np.all(np.isfinite([r[k] for r in rows.values() for k in ("psnr", "ssim")]))
  assert np.all(np.isfinite([r["ms_median"] for v, r in rows.items() if v != "dcae_ceiling"]))
  # Pruning removes parameters and MACs; the encoder-free pipeline is the cheapest learned one.
  assert rows["pruned"]["params"] < rows["onestep"]["params"]
  assert rows["pruned"]["macs"] < rows["onestep"]["macs"]
  assert rows["encoder_free"]["macs"] < rows["onestep"]["macs"]
  assert {r["attention"] for r in result["sweep"]} == {"linear", "softmax"}
  assert np.all(np.isfinite(_numbers(result["sweep"])))
  assert "| one-step (LoRA) |" in (out / "sana_sr.md").read_text()
