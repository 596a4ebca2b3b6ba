"""The VDE table script end to end at the smoke preset, and its NFE matching, paired statistics and
rule verdicts on known answers."""
import json

import numpy as np
import pytest

from experiments.tables import vde
from tests.experiments.smoke import run_table


@pytest.mark.slow
def test_vde_table_smoke_writes_finite_results(tmp_path, smoke_runs):
  out = run_table("vde", tmp_path, smoke_runs, ["image_crops_smoke"], timeout=900)
  for name in ("vde.md", "vde.json", "vde_psnr_nfe.png", "vde_teacache_coefficients.json"):
    assert (out / name).stat().st_size > 0, name
  result = json.loads((out / "vde.json").read_text())
  s = vde.SETTINGS["smoke"]
  assert set(result["models"]) == {*s["models"], "testbed"} and set(s["models"]) <= set(vde.MODELS)
  methods = {"VDE", "Euler, fewer steps", "TeaCache", "FORA-style", *vde.RULES.values()}
  for name, block in result["models"].items():
    assert block["cfg_scale"] == 4.0 and block["shift"] == 3.0, name    # the paper's regime
    rows = block["rows"]
    assert methods <= {r["method"] for r in rows}, name
    assert sum(r["method"].startswith("EasyCache") for r in rows) == 2 * len(s["intervals"])
    for r in rows:
      assert np.isfinite([r["psnr"], r["ssim"], r["seconds"], r["speedup"]]).all(), (name, r)
      assert 1 <= r["nfe"] < s["steps"], (name, r)
      searched = r.get("searched")
      if searched and len(searched["settings"]) == 2:       # bracketed: interpolated at the target
        assert r["nfe"] == pytest.approx(r["target_nfe"]), (name, r)
      if r["method"] not in ("VDE", "FORA-style"):
        assert r["vs VDE"]["psnr"]["verdict"] in ("win", "loss", "tie"), (name, r)
    tc = block["teacache"]
    assert tc["constrained"] and tc["r2"] <= 1 and tc["calibrated"] == (tc["r2"] >= 0.5), name
  crops = result["models"]["image_crops_cond"]
  assert crops["image_shape"] == [32, 32, 3]
  assert crops["num_classes"] == 6 and crops["info"]["trained_shift"] == 3.0
  assert (tmp_path / "runs" / "image_crops_cond_smoke").is_dir()
  regression = result["regression"]
  assert set(regression["by_interval"]) == {str(k) for k in s["intervals"]}
  assert not regression["compared"] and not regression["reproduced"]   # cpu numbers only
  assert set(result["rules"]["per_rule"]) == set(vde.RULES)
  md = (out / "vde.md").read_text()
  for title in [vde.MODELS[name]["title"] for name in s["models"]] + [vde.TESTBED["title"]]:
    assert f"## {title}" in md
  assert "## Adaptive intervals against the fixed schedule" in md and "## Regression" in md


def _family(rng, num_samples):
  """A fake searched family: sample i needs NFE floor(a_i - 10 log10(p / 1e-3)), its 'image' is its
  NFE (so quality is known), for random offsets a_i."""
  a_N = rng.uniform(40, 50, num_samples)
  calls = []

  def evaluate(p):
    calls.append(p)
    nfe_N = np.clip(np.floor(a_N - 10 * np.log10(p / 1e-3)), 1, None)
    return nfe_N, nfe_N

  return evaluate, calls


@pytest.mark.parametrize("target", [16, 18, 22])
def test_bracket_and_interpolate_hit_the_target_nfe_exactly(rng, target):
  evaluate, calls = _family(rng, 16)
  memo = {}
  lo, hi = vde.bracket(evaluate, lambda p: p, target, 12, memo)
  (p_lo, (x_lo, nfe_lo)), (p_hi, (x_hi, nfe_hi)) = lo, hi
  assert p_lo < p_hi and nfe_lo.mean() > target >= nfe_hi.mean()
  assert len(memo) == len(calls) == len(set(calls))           # no setting evaluated twice
  # Quality = the sample's NFE: interpolating it at the target must give the target on average.
  out = vde.interpolate(lo, hi, target, lambda x: (x, 2 * x))
  assert out["nfe"] == pytest.approx(target)
  assert out["psnr_B"].mean() == pytest.approx(target) and out["ssim_B"].mean() == pytest.approx(2 * target)
  np.testing.assert_allclose(out["psnr_B"], (1 - out["w"]) * x_lo + out["w"] * x_hi)
  assert out["timed"] == (p_hi if out["w"] >= 0.5 else p_lo)
  # The memo is reused: with no bisection steps left the same bracket comes back without evaluating,
  # and another target evaluates no setting twice.
  before = len(calls)
  again = vde.bracket(evaluate, lambda p: p, target, 0, memo)
  assert len(calls) == before and (again[0][0], again[1][0]) == (p_lo, p_hi)
  (_, (_, nfe_lo2)), (_, (_, nfe_hi2)) = vde.bracket(evaluate, lambda p: p, target - 3, 12, memo)
  assert nfe_lo2.mean() > target - 3 >= nfe_hi2.mean() and len(calls) == len(set(calls))


def test_bracket_when_the_family_cannot_spend_the_target(rng):
  evaluate, _ = _family(rng, 4)
  lo, hi = vde.bracket(evaluate, lambda p: p, 60, 5, {})     # NFE <= 50 everywhere
  assert lo is None and hi[0] == vde.SEARCH_START
  out = vde.interpolate(lo, hi, 60, lambda x: (x, x))
  assert out["nfe"] == pytest.approx(hi[1][1].mean()) and out["w"] == 1.0


def test_paired_difference_and_verdict(rng):
  base = rng.normal(30, 3, 64)
  noise = rng.normal(0, 0.1, 64)
  for shift, verdict in ((1.0, "win"), (-1.0, "loss"), (0.0, None)):
    d = vde.paired(base + shift + noise, base)
    diff = shift + noise
    assert d["diff"] == pytest.approx(diff.mean())
    assert d["se"] == pytest.approx(diff.std(ddof=1) / np.sqrt(64))
    expected = verdict or ("win" if diff.mean() > 2 * d["se"] else
                           "loss" if diff.mean() < -2 * d["se"] else "tie")
    assert d["verdict"] == expected
  assert vde.paired(base, base)["verdict"] == "tie"


def test_rule_verdicts_need_two_of_three_budgets_on_every_dit():
  def result(wins):   # method -> verdicts at targets 22, 18, 16
    rows = []
    for method, verdicts in wins.items():
      for target, v in zip((22, 18, 16), verdicts):
        rows.append({"method": method, "target_nfe": target,
                     "vs VDE": {"psnr": {"diff": 1.0 if v == "win" else 0.0, "se": 0.1, "verdict": v}}})
    return {"rows": rows}

  a, b, c, d = vde.RULES.values()
  digits = result({a: ["win", "win", "tie"], b: ["win", "win", "win"], c: ["win"] * 3, d: ["tie"] * 3})
  crops = result({a: ["win", "tie", "tie"], b: ["win", "tie", "win"], c: ["tie"] * 3, d: ["win"] * 3})
  out = vde.rule_verdicts({"digits": digits, "image_crops_cond": crops})
  assert out["default"] == "(b) residual"
  assert out["per_rule"]["(a) alpha/beta speed"]["digits"][18]["verdict"] == "win"
  out = vde.rule_verdicts({"digits": digits, "image_crops_cond": result({b: ["tie"] * 3, a: ["tie"] * 3,
                                                                          c: ["tie"] * 3, d: ["tie"] * 3})})
  assert out["default"] is None
