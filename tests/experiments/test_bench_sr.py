"""experiments/bench_sr.py at the smoke preset (the paper preset's counts take ~30 s to lower)."""
import json

from experiments import bench_sr


def test_bench_sr_counts_both_pipelines_and_times_one(tmp_path, capsys):
  out = tmp_path / "b.json"
  bench_sr.main(["--preset", "smoke", "--macs_only", "--out", str(out)])
  costs = json.loads(out.read_text())["costs_512"]
  assert set(costs) == {"dcae", "encoder_free", "dcae_softmax", "encoder_free_softmax"}
  # The encoder-free pipeline drops the encoder and narrows the decoder: fewer MACs and parameters.
  assert costs["encoder_free"]["macs"] < costs["dcae"]["macs"]
  assert costs["encoder_free"]["params"] < costs["dcae"]["params"]
  assert costs["dcae"]["params"] == costs["dcae_softmax"]["params"]     # same sizes either way
  assert "G MACs at 512 px" in capsys.readouterr().out
  model, params, ae_params, base = bench_sr.paper_models(preset="smoke")["encoder_free"]
  row = bench_sr.latency(model, params, ae_params, base, 64, repeats=2)
  assert 0 < row["ms_min"] <= row["ms_median"] and row["compile_s"] > 0
