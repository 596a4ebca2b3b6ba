"""experiments/bench_pid.py: the smoke preset end to end on a CPU, its JSON, and the paper preset refused."""
import json
import math

import pytest

from experiments import bench_pid


@pytest.mark.slow      # ~20 s with a cold compilation cache (the init and the decode compile), ~7 s warm
def test_smoke_decode_writes_finite_record(tmp_path, capsys):
  out = tmp_path / "bench.json"
  bench_pid.main(["--preset", "smoke", "--latent_size", "1", "--steps", "2", "--warmup", "1",
                  "--repeats", "2", "--out", str(out)])
  printed = capsys.readouterr().out
  assert "ms / decode (median)" in printed and f"wrote {out}" in printed
  r = json.loads(out.read_text())
  # 1 latent cell x AE factor 8 x scale 4 = a 32 px output.
  assert r["latent_shape"] == [1, 1, 1, 16] and r["image_shape"] == r["output_shape"] == [1, 32, 32, 3]
  assert r["steps"] == 2 and len(r["schedule"]) == 3 and r["schedule"][-1] == 0.0
  assert r["output_finite"] and r["params"] == r["params_backbone"] + r["params_adapter"]
  for field in ("params_backbone", "params_adapter", "trace_s", "compile_s", "decode_ms_min",
                "decode_ms_median", "step_ms_median", "compiled_bytes", "max_rss_bytes", "flops",
                "tflops_per_s"):
    assert math.isfinite(r[field]) and r[field] > 0, field
  assert len(r["decode_ms"]) == 2 and r["decode_ms_min"] <= r["decode_ms_median"]
  assert r["peak_device_bytes"] is None or r["peak_device_bytes"] > 0     # None on a CPU
  assert r["reference"]["target_decode_ms"] == pytest.approx(1.2 * 333.5)
  assert "meets_latency_target" not in r                                 # paper sizes only


def test_eval_shape_traces_without_compiling(capsys):
  bench_pid.main(["--preset", "smoke", "--eval_shape"])
  assert "-> float32[1, 64, 64, 3], 4 steps" in capsys.readouterr().out


def test_paper_preset_refused_on_cpu():
  with pytest.raises(SystemExit, match="hours on a CPU.*--force"):
    bench_pid.main(["--preset", "paper"])


def test_device_slug():
  assert bench_pid.device_slug("NVIDIA H200") == "nvidia_h200"
  assert bench_pid.device_slug("cpu") == "cpu"
