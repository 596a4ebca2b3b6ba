"""Table scripts end to end at the smoke preset (flow, relay, precise), and their helpers on known answers."""
import json

import numpy as np
import pytest

from core import metrics
from experiments.tables import flow, precise, relay
from tests.experiments.smoke import run_table


def _numbers(tree):
  if isinstance(tree, dict):
    return [x for v in tree.values() for x in _numbers(v)]
  if isinstance(tree, list):
    return [x for v in tree for x in _numbers(v)]
  return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


@pytest.mark.slow
def test_flow_table_smoke_writes_finite_results(tmp_path, smoke_runs):
  out = run_table("flow", tmp_path, smoke_runs, ["flow_2d_smoke", "digits_smoke"])
  for name in ("flow.md", "flow.json", "flow_2d_samples.png", "flow_digits_samples.png"):
    assert (out / name).stat().st_size > 0, name
  result = json.loads((out / "flow.json").read_text())
  numbers = _numbers(result)
  assert numbers and np.all(np.isfinite(numbers))
  rows = {row["steps"]: row for row in result["flow_2d"]["rows"]}
  floor, noise = rows[None], rows[0]
  assert floor["energy"] < noise["energy"] and floor["sw1"] < noise["sw1"]
  assert floor["ring_fraction"] > 0.95 > noise["ring_fraction"]
  assert set(flow.STEPS) <= set(rows)
  settings = {(row["steps"], row["cfg_scale"]) for row in result["digits"]["rows"]}
  assert {(s, c) for s in flow.STEPS for c in flow.CFG_SCALES} <= settings
  assert 0.8 < result["digits"]["classifier_test_accuracy"] <= 1.0
  md = (out / "flow.md").read_text()
  assert "| held-out data (floor) |" in md and "| 50 | 4 |" in md


def test_ring_fraction_and_class_diversity(rng):
  angle = rng.uniform(0, 2 * np.pi, 4)
  radii = np.array([1.1, 1.9, 1.5, 2.5])   # within 0.15 of a ring: the first two
  points = radii[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)
  assert flow.ring_fraction(points) == 0.5
  images = np.zeros((4, 2, 2, 1))
  images[1] += 1.0      # class 0: distance 2 (four pixels differ by 1)
  images[3] += 3.0      # class 1: distance 6
  np.testing.assert_allclose(metrics.class_diversity(images, np.array([0, 0, 1, 1])), 4.0)


@pytest.mark.slow
def test_relay_table_smoke_writes_finite_results(tmp_path, smoke_runs):
  out = run_table("relay", tmp_path, smoke_runs, ["relay_sudoku_relay_s0", "relay_code_relay"])
  for name in ("relay.md", "relay.json", "relay_sudoku_tau.png", "relay_sudoku_curve.png",
               "relay_code_tau.png"):
    assert (out / name).stat().st_size > 0, name
  result = json.loads((out / "relay.json").read_text())
  for objective in relay.SUDOKU_OBJECTIVES:
    (run,) = result["sudoku"][objective]                  # one seed at the smoke preset
    assert [row["tau"] for row in run["sweep"]] == list(relay.SUDOKU_TAUS)
    assert all(1 <= row["nfe"] <= 8 and 0 <= row["exact_match"] <= row["blank_accuracy"] <= 1
               and row["nfe_authors"] >= row["nfe"] for row in run["sweep"])
    assert np.all(np.isfinite(_numbers(run["sweep"])))
  for baseline in relay.BASELINES:     # continued from its equal-steps run, never shorter
    (run,) = result["wallclock"][baseline]
    assert run["train"]["steps"] >= result["sudoku"][baseline][0]["train"]["steps"]
  (held,) = result["holdout"]
  assert held["puzzles"] == 64 and held["with_solution"] == 64 and held["grid"] == "9x9"
  for objective in relay.CODE_OBJECTIVES:
    sweep = result["code"][objective]["sweep"]
    assert [row["tau"] for row in sweep] == list(relay.CODE_TAUS)
    # A block counts as exact only when all its tokens are right.
    assert all(row["block_exact_match"] <= row["accuracy"] for row in sweep)
    assert all(sum(row["exact_f"]) == round(row["block_exact_match"] * row["blocks"]) for row in sweep)
    assert sweep[0]["tau"] == 0.0 and sweep[0]["nfe"] == 1.0   # every confidence > 0: one round


def _run(nfe_em):
  return {"sweep": [{"tau": t, "nfe": n, "exact_match": e} for t, (n, e) in zip(relay.SUDOKU_TAUS, nfe_em)]}


def test_nfe_saving_reads_each_seed_at_the_best_baselines_exact_match():
  equal = {"mlm": [_run([(20, 0.1), (10, 0.05)]), _run([(20, 0.3), (12, 0.2)])],
           "rollout": [_run([(30, 0.2), (15, 0.1)]), _run([(25, 0.1)])],
           "relay": [_run([(8, 0.5), (4, 0.1)]), _run([(6, 0.25), (10, 0.35)])]}
  s = relay.nfe_saving(equal)
  first, second = s["per_seed"]
  assert first["baseline"] == "rollout" and first["exact_match"] == 0.2 and first["baseline_nfe"] == 30
  np.testing.assert_allclose(first["relay_nfe"], 4 + 4 * (0.2 - 0.1) / 0.4)   # interpolated
  assert second["baseline"] == "mlm" and second["baseline_nfe"] == 20
  np.testing.assert_allclose(second["relay_nfe"], 6 + 4 * 0.05 / 0.1)
  savings = [1 - first["relay_nfe"] / 30, 1 - second["relay_nfe"] / 20]
  np.testing.assert_allclose(s["saving_mean"], np.mean(savings))
  np.testing.assert_allclose(s["saving_se"], np.std(savings, ddof=1) / np.sqrt(2))


@pytest.mark.slow
def test_precise_table_smoke_writes_finite_results(tmp_path, smoke_runs):
  # The 2-D problem only: the digits GRPO config runs in test_main's smoke test.
  out = run_table("precise", tmp_path, smoke_runs, ["flow_2d_smoke"], "--problems", "2d")
  for name in ("precise.md", "precise.json", "precise_curves.png"):
    assert (out / name).stat().st_size > 0, name
  result = json.loads((out / "precise.json").read_text())
  rows = result["consistency"]["rows"]
  assert {row["method"] for row in rows} == set(precise.CONSISTENCY_ETAS)
  assert all(np.isfinite(row["energy"]) and row["energy"] >= 0 for row in rows)
  assert list(result["rl"]) == ["2d"] and list(result["rl"]["2d"]) == ["matched"]
  for r in result["rl"]["2d"].values():
    assert set(r["samplers"]) == set(precise.SAMPLERS)
    for x in r["samplers"].values():
      for key in precise.EVALS:
        assert x["steps"][0] == 0 and len(x["steps"]) == len(x[key]["mean"]) > 1
        assert np.all(np.isfinite(x[key]["mean"])) and x[key]["mean"][0] == x["step0"][key]
      assert x["seconds_per_iteration"] > 0
      assert 0 <= x["clip"]["clip_frac_u2"] <= 1 and x["clip"]["clip_frac_u1"] == 0
    # Step 0 is each sampler's own: the ODE evaluations agree across samplers, the own-SDE ones differ.
    step0 = [x["step0"] for x in r["samplers"].values()]
    assert len({round(s["reward_ode"], 6) for s in step0}) == 1
    assert len({round(s["reward_sde"], 6) for s in step0}) == len(step0)
    for c in r["comparison"].values():
      best = c["samplers"][c["best"]]["final"]["mean"]
      assert best is not None and best <= r["samplers"][c["best"]]["steps"][-1]
  text = (out / "precise.md").read_text()
  assert "FLUX.2 Klein 4B" in text and "FLUX.1" not in text


def test_race_and_verdict_on_hand_made_curves():
  """Iterations to a target on hand-made curves (mean and per seed, interpolated), steady-state
  rate, and the win / tie / loss rule."""
  steps = [0, 10, 20, 30]
  curves = [[0.0, 0.2, 0.6, 0.8], [0.0, 0.4, 0.8, 1.0]]      # mean: 0, 0.3, 0.7, 0.9
  r = precise.race(steps, curves, 0.5)
  np.testing.assert_allclose(r["mean"], 15.0)               # 0.3 -> 0.7 between 10 and 20
  np.testing.assert_allclose(r["per_seed"], [17.5, 12.5])
  late = precise.race(steps, curves, 0.95)["per_seed"]
  assert late[0] is None and late[1] == pytest.approx(27.5)        # seed 0 never gets there
  assert precise.race(steps, curves, 1.5) == {"mean": None, "per_seed": [None, None]}
  assert precise.saving(15.0, 20.0) == pytest.approx(0.25) and precise.saving(None, 20.0) is None
  rate, startup = precise.steady_rate([10, 20, 30], [25.0, 30.0, 35.0])
  assert (rate, startup) == (0.5, 20.0)
  assert precise.verdict([1.0, 1.1, 1.2], [0.5, 0.6, 0.7]) == "win"       # gap 0.5 > 2 * 0.1
  assert precise.verdict([0.5, 0.6, 0.7], [1.0, 1.1, 1.2]) == "loss"
  assert precise.verdict([1.0, 1.1, 1.2], [0.9, 1.0, 1.1]) == "tie"       # gap 0.1 < 2 * 0.1
  assert precise.verdict([1.0, 0.8, 1.3], [0.9, 0.9, 1.0]) == "tie"       # signs differ
  with pytest.raises(ValueError, match="paired finals"):
    precise.verdict([1.0], [0.5])


def test_first_crossing_interpolates_between_evaluations():
  steps, secs, reward = [0, 10, 20], [0.0, 5.0, 12.0], [0.1, 0.5, 0.9]
  assert metrics.first_crossing(steps, reward, 0.1) == 0.0
  np.testing.assert_allclose(metrics.first_crossing(steps, reward, 0.7), 15.0)
  np.testing.assert_allclose(metrics.first_crossing(secs, reward, 0.7), 8.5)
  assert metrics.first_crossing(steps, reward, 0.95) is None
