"""VDE (arXiv 2605.23381) against caching baselines at matched NFE: quality with paired errors, speed.

  python -m experiments.tables.vde --preset cpu [--runs runs/tables] [--out results]

Models (MODELS), each sampled on Flux's shifted grid (shift 3) with CFG 4, the regime of the paper:
- the class-conditional digits DiT of `experiments.tables.flow` (workdir RUNS/digits_PRESET);
- the image_crops DiT conditioned on the crop's source photo (`flow_images.py:PRESET,image_crops_cond`,
  trained at shift 3; RUNS/image_crops_cond_PRESET);
- the analytic testbed (`flowrl.cache.testbed`): the exact flow of Gaussian-smoothed 8x8 digits.
Per model: TeaCache's polynomial is fitted to it under constraints (`calibrate.fit_monotone`, on noise
other than the evaluation's); every policy samples the same noise; quality is PSNR / SSIM against the
full-step Euler output of that noise. The fixed VDE schedules set three NFE targets; each adaptive
method's setting is searched on the evaluation samples themselves and its per-sample quality
interpolated linearly in NFE between the two settings that bracket the target, so every row sits at
the exact target. Differences against fixed VDE and against Euler with as many steps carry their
paired standard errors; a win needs more than 2 of them. Every policy is timed in interleaved rounds,
`timing_batch` samples per call (cpu: one), each call's minimum over `timing_runs` summed over the
calls. A regression section re-runs the fixed schedules on the unconditional image_crops DiT at
shift 1 (the table before issue 17). Writes vde.md, vde.json, vde_psnr_nfe.png and
vde_teacache_coefficients.json into --out.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import experiments.tasks  # noqa: F401  (registers the tasks)
from core import flow_task, metrics, train, writers
from experiments.configs import flow_images
from experiments.training import table_parser, train_timed
from flowrl.cache import calibrate, sampling, testbed, vde

FORA_PERIOD = 3
# Identical images have infinite PSNR; the table caps it here.
PSNR_CAP = 100.0
# A quality difference "wins" (or loses) when it exceeds this many paired standard errors.
WIN_SE = 2.0
# Per preset: Euler steps of the reference, VDE's stable_step and intervals (Flux: 6 and 3 / 4 / 5 of
# 50 steps), evaluation samples (testbed: its own count), TeaCache's calibration samples, bisection
# steps of the search per target (`bracket`), samples timed and per timed call, interleaved timing
# rounds, and the DiTs of MODELS evaluated (default: all).
SETTINGS = {"smoke": {"steps": 12, "stable_step": 2, "intervals": [5], "samples": 4,
                      "testbed_samples": 4, "calibration_samples": 4, "search_evals": 2,
                      "timing_samples": 4, "timing_batch": 4, "timing_runs": 2,
                      # one DiT (the digits one runs the same code), to keep the suite's smoke short
                      "models": ("image_crops_cond",)},
            "cpu": {"steps": 50, "stable_step": 6, "intervals": [3, 4, 5], "samples": 64,
                    "testbed_samples": 256, "calibration_samples": 64, "search_evals": 5,
                    "timing_samples": 16, "timing_batch": 1, "timing_runs": 11},
            "paper": {"steps": 50, "stable_step": 6, "intervals": [3, 4, 5], "samples": 256,
                      "testbed_samples": 1024, "calibration_samples": 128, "search_evals": 10,
                      "timing_samples": 64, "timing_batch": 1, "timing_runs": 9}}
# The DiTs: the `flow_images` config argument is PRESET + suffix, the workdir RUNS/NAME_PRESET;
# cfg_scale / shift: the sampling regime (None: the run's own).
MODELS = {
    "digits": {"suffix": "", "cfg_scale": 4.0, "shift": 3.0,
               "title": "Class-conditional digits DiT, CFG 4, shift 3",
               "data": "16x16x1 digits, labels 0-9 in turn"},
    "image_crops_cond": {"suffix": ",image_crops_cond", "cfg_scale": None, "shift": None,
                         "title": "image_crops DiT conditioned on the source photo, CFG 4, shift 3",
                         "data": "32x32x3 photograph crops, the 6 training photos' labels in turn"},
}
# The analytic testbed: sklearn's 8x8 digits (values 0-16 mapped to [-1, 1]) as the means of a
# Gaussian mixture of this smoothing, labelled by digit.
TESTBED = {"title": "Analytic testbed: smoothed 8x8 digits, exact velocity, CFG 4, shift 3",
           "components": 500, "smoothing": 0.1, "cfg_scale": 4.0, "shift": 3.0}
# The table before issue 17 (results/vde.md of commit ecf1642): fixed VDE on the unconditional
# image_crops DiT at shift 1, PSNR (dB) per interval, which the regression section must reproduce.
REGRESSION = {"name": "image_crops", "suffix": ",image_crops", "tolerance_db": 0.3,
              "psnr": {3: 40.80, 4: 38.30, 5: 35.94}}
# Where the search for a setting starts; it grows 4x until the NFE is at most the target.
SEARCH_START = 1e-3
# Adaptive VDE rules compared against the fixed schedule (issue 17): the label, the JSON key.
RULES = {"(a) alpha/beta speed": "VDE-adaptive (a)", "(b) residual": "VDE-residual (b)",
         "(c) budget-aware": "VDE-budget (c)", "(d) re-orthogonalised u": "VDE, re-orth. u (d)"}
# The paper's Flux.1-dev rows against its 50-step output (design doc vde.md).
PAPER_ROWS = [
    {"method": "VDE (interval 5)", "nfe": "16", "speedup": "3.22x (code README: 3.01x on A100)",
     "lpips": "0.1997", "ssim": "0.8267", "psnr": "23.19"},
    {"method": "VDE (slow setting)", "nfe": "", "speedup": "2.21x", "lpips": "0.1243", "ssim": "",
     "psnr": ""}]
PAPER_OTHER = ("Qwen-Image: VDE LPIPS 0.0691 vs EasyCache-fast 0.1445 (-52%); Wan2.1: VDE LPIPS 0.0554 "
               "vs TeaCache 0.1277")


# ----------------------------------------------------------------------------------------------
# Models: each gives make_net(x [B, ...], y [B] | None) -> sampling.Network and its sampling regime.


def dit_model(preset: str, runs: str, name: str, suffix: str, cfg_scale=None, shift=None) -> dict:
  """A flow_images DiT, trained or reused, as {make_net, shape, labels, cfg_scale, shift, info}."""
  config = flow_images.get_config(preset + suffix)
  workdir = os.path.join(runs, f"{name}_{preset}")   # digits: experiments.tables.flow's run
  trained = train_timed(config, workdir)
  params, config = train.restore_params(workdir)
  model = flow_task.build_model(config)
  shape = flow_task.example_shape(config)
  cfg = float(config.flow.cfg_scale if cfg_scale is None else cfg_scale)
  num_classes = int(config.model.num_classes)
  mc = config.model
  return {"make_net": lambda x, y: sampling.dit_network(model, params, x.shape[1:], y=y, cfg_scale=cfg),
          "shape": shape, "cfg_scale": cfg, "num_classes": num_classes,
          "shift": float(config.flow.sample_shift if shift is None else shift),
          "info": {"workdir": workdir, "train": trained, "params": metrics.param_count(params),
                   "network": f"DiT width {mc.width}, depth {mc.depth}, patch {mc.patch_size}",
                   "trained_shift": float(config.flow.shift)}}


def testbed_model() -> dict:
  """The analytic testbed of TESTBED as dit_model's dict."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  n = TESTBED["components"]
  means = (digits.images[:n] / 8.0 - 1.0).astype(np.float32)[..., None]    # [N, 8, 8, 1] in [-1, 1]
  bed = testbed.mixture(means, TESTBED["smoothing"], labels=digits.target[:n])
  cfg = TESTBED["cfg_scale"]
  return {"make_net": lambda x, y: testbed.network(bed, y=y, cfg_scale=cfg), "shape": means.shape[1:],
          "cfg_scale": cfg, "num_classes": bed.num_classes, "shift": TESTBED["shift"],
          "info": {"components": n, "smoothing": TESTBED["smoothing"]}}


# ----------------------------------------------------------------------------------------------
# Matching a target NFE exactly


def bracket(evaluate, make, target: float, evals: int, memo: dict) -> tuple:
  """The settings p_lo < p_hi of a family whose NFE falls as p grows (make: p -> policy) that bracket
  `target`: NFE(p_lo) > target >= NFE(p_hi), the pair found by growing p 4x from SEARCH_START and then
  `evals` geometric bisection steps (stopping once NFE(p_hi) is within 0.05 of the target).

  evaluate: policy -> (x, nfe_B); memo: p -> that result, shared by the family's targets. Returns
  ((p_lo, result), (p_hi, result)); (None, (SEARCH_START, result)) when even SEARCH_START is at or
  below the target, and (None, (p, result)) for the largest p tried when none gets down to it.
  """
  def result(p):
    if p not in memo:
      memo[p] = evaluate(make(p))
    return memo[p]

  nfe = lambda p: float(np.mean(result(p)[1]))
  nfe(SEARCH_START)
  above = [p for p in memo if nfe(p) > target]
  if not above:            # even the smallest setting is at or below the target
    return None, (SEARCH_START, result(SEARCH_START))
  lo = max(above)
  below = [p for p in memo if p > lo and nfe(p) <= target]
  hi = min(below) if below else None
  while hi is None:
    if lo * 4 > 1e6:         # the family cannot spend as little: its cheapest setting tried
      return None, (lo, result(lo))
    lo, hi = (lo * 4, None) if nfe(lo * 4) > target else (lo, lo * 4)
  for _ in range(evals):
    if nfe(hi) >= target - 0.05 or hi / lo < 1 + 1e-4:
      break
    mid = float(np.sqrt(lo * hi))
    lo, hi = (lo, mid) if nfe(mid) <= target else (mid, hi)
  return (lo, result(lo)), (hi, result(hi))


def interpolate(lo, hi, target: float, quality) -> dict:
  """Per-sample quality at the exact target NFE: linear in the mean NFE between the bracketing
  settings (`bracket`), each sample's PSNR and SSIM mixed with the same weights.

  quality: x -> (psnr_B, ssim_B). Returns {nfe, psnr_B, ssim_B, w (the weight of p_hi), settings}."""
  p_hi, (x_hi, nfe_hi_B) = hi
  q_hi, nfe_hi = quality(x_hi), float(np.mean(nfe_hi_B))
  if lo is None:           # the family cannot spend more: its smallest setting, at its own NFE
    return {"nfe": nfe_hi, "psnr_B": q_hi[0], "ssim_B": q_hi[1], "w": 1.0,
            "settings": [(p_hi, nfe_hi)], "timed": p_hi}
  p_lo, (x_lo, nfe_lo_B) = lo
  q_lo, nfe_lo = quality(x_lo), float(np.mean(nfe_lo_B))
  w = (nfe_lo - target) / (nfe_lo - nfe_hi)
  mix = lambda a, b: (1 - w) * a + w * b
  return {"nfe": float(mix(nfe_lo, nfe_hi)), "psnr_B": mix(q_lo[0], q_hi[0]),
          "ssim_B": mix(q_lo[1], q_hi[1]), "w": float(w), "settings": [(p_lo, nfe_lo), (p_hi, nfe_hi)],
          "timed": p_hi if w >= 0.5 else p_lo}


# ----------------------------------------------------------------------------------------------
# One model's rows


def families(s: dict, coefficients, interval_of: dict) -> dict:
  """Searched methods: label -> (setting name, (p, target) -> policy, capped); NFE falls as p grows.
  capped: the family never spends more than the target (the budget rule), so its match is the
  largest setting that still spends all of it (see `run_model`)."""
  ss, steps = s["stable_step"], s["steps"]
  published = max(2, round(10 * steps / 50))       # 10 of Wan2.1's 50 steps
  warmups = {f"EasyCache (warm-up {published}, published)": published,
             f"EasyCache (warm-up {ss + 1}, VDE's)": ss + 1}
  out = {RULES["(a) alpha/beta speed"]: ("tolerance", lambda p, n: sampling.vde_adaptive(p, ss), False),
         RULES["(b) residual"]: ("tolerance", lambda p, n: sampling.vde_residual(p, ss, interval_of[n]),
                                 False),
         RULES["(c) budget-aware"]: ("tolerance", lambda p, n: sampling.vde_budget(n, p, ss), True),
         "TeaCache": ("threshold", lambda p, n: sampling.teacache(p, coefficients), False)}
  for label, warmup in warmups.items():
    out[label] = ("tau", lambda p, n, w=warmup: sampling.easycache(p, w), False)
  return out


def paired(a_B: np.ndarray, b_B: np.ndarray) -> dict:
  """The mean difference a - b, its paired standard error and the verdict (WIN_SE errors)."""
  mean, se = metrics.mean_and_se(np.asarray(a_B) - np.asarray(b_B))
  verdict = "win" if mean > WIN_SE * se else ("loss" if mean < -WIN_SE * se else "tie")
  return {"diff": float(mean), "se": float(se), "verdict": verdict}


def run_model(m: dict, s: dict, name: str, samples: int, searched: bool = True) -> dict:
  """Every row for the model m (`dit_model` / `testbed_model`); searched=False: the fixed VDE
  schedules and the reference only (the regression section)."""
  t0 = time.perf_counter()
  steps, shift = s["steps"], m["shift"]
  labels = (lambda n: jnp.arange(n, dtype=jnp.int32) % m["num_classes"]) if m["num_classes"] else (
      lambda n: None)
  run = jax.jit(lambda policy, x, y: sampling.sample_each(m["make_net"], x, steps, policy, y=y,
                                                          shift=shift))
  x_T = jax.random.normal(jax.random.PRNGKey(0), (samples, *m["shape"]))
  y = labels(samples)
  reference = run(sampling.full(), x_T, y)[0]
  quality = lambda x: metrics.image_quality_per_sample(x, reference, psnr_cap=PSNR_CAP)
  evaluate = lambda policy: jax.device_get(run(policy, x_T, y))
  rows = []

  def add(method, setting, target, result, policy, extra=None):
    row = {"method": method, "setting": setting, "target_nfe": target, "policy": policy, **result,
           **(extra or {})}
    rows.append(row)
    writers.log(f"{name}: {method} {setting}: NFE {row['nfe']:.2f}, PSNR {np.mean(row['psnr_B']):.2f}")

  def fixed(method, setting, target, policy):
    x, nfe_B = evaluate(policy)
    psnr_B, ssim_B = quality(x)
    add(method, setting, target, {"nfe": float(np.mean(nfe_B)), "psnr_B": psnr_B, "ssim_B": ssim_B},
        policy)

  targets = {len(vde.full_step_indices(steps, s["stable_step"], k)): k for k in s["intervals"]}
  for target, interval in targets.items():
    fixed("VDE", f"interval {interval}", target, sampling.vde(s["stable_step"], interval))
  calibration = None
  if searched:
    x_cal = jax.random.normal(jax.random.PRNGKey(1), (s["calibration_samples"], *m["shape"]))
    y_cal = labels(s["calibration_samples"])
    d_in, d_out = jax.jit(lambda x, y: calibrate.relative_changes(m["make_net"](x, y), x, steps,
                                                                  shift=shift))(x_cal, y_cal)
    calibration = {**calibrate.fit_monotone(np.asarray(d_in), np.asarray(d_out)),
                   "plain_r2": calibrate.fit(np.asarray(d_in), np.asarray(d_out))["r2"],
                   "num_samples": s["calibration_samples"], "num_steps": steps,
                   "cfg_scale": m["cfg_scale"], "shift": shift}
    for target, interval in targets.items():
      fixed(RULES["(d) re-orthogonalised u"], f"interval {interval}", target,
            sampling.vde(s["stable_step"], interval, reorthogonalize=True))
      fixed("Euler, fewer steps", f"{target} steps", target, sampling.fewer_steps(target))
    for method, (setting, make, capped) in families(s, calibration["coefficients"], targets).items():
      # The residual and budget rules' families change with the target (start interval, budget).
      per_target = method in (RULES["(b) residual"], RULES["(c) budget-aware"])
      memos = {}
      for target in targets:
        memo = memos.setdefault(target if per_target else 0, {})
        # A capped family spends the whole budget up to some setting and less beyond it: bracketing
        # just below the target finds that boundary, and the interpolation then takes its lower side.
        match = target - 0.01 if capped else target
        lo, hi = bracket(evaluate, lambda p: make(p, target), match, s["search_evals"], memo)
        result = interpolate(lo, hi, target, quality)
        settings = " / ".join(f"{p:.4g}" for p, _ in result["settings"])
        if capped and lo is None and hi[0] > SEARCH_START:   # spends the budget at any setting
          settings = f"any (all up to {hi[0]:.3g} spend the budget)"
        add(method, f"{setting} {settings}", target, result, make(result.pop("timed"), target),
            {"searched": {"setting": setting, "evaluations": len(memo),
                          "settings": result.pop("settings")}})
    fixed("FORA-style", f"every {FORA_PERIOD} steps", len(range(0, steps, FORA_PERIOD)),
          sampling.fora(FORA_PERIOD))
  t_quality = time.perf_counter()
  if not searched:
    return {"rows": [{"setting": r["setting"], "nfe": r["nfe"], "psnr": float(np.mean(r["psnr_B"]))}
                     for r in rows], "shift": shift, "cfg_scale": m["cfg_scale"]}

  # Interleaved timing of the reference and every row's policy (a searched row: the bracketing
  # setting nearer its target) on the first timing_samples samples, timing_batch samples per call
  # (cpu: 1): a policy's seconds are the sum over its calls of each call's minimum over the rounds.
  # Calls of ~0.1 s rarely span a disturbance of the machine; timing all samples in one call (~1.5 s
  # for the reference) put measured speed-ups up to 9% above their NFE ratio on this 2-core machine,
  # since the reference's long calls never escaped them (a probe: +3.7% in one call, +0.8% one sample
  # per call). The smoke preset times its whole batch at once, reusing the evaluation's compilation.
  n = min(s["timing_samples"], samples)
  chunks = [slice(i, min(i + s["timing_batch"], n)) for i in range(0, n, s["timing_batch"])]
  xs = [x_T[c] for c in chunks]
  ys = [None if y is None else y[c] for c in chunks]
  policies = [sampling.full()] + [r["policy"] for r in rows]
  calls = [(k, j) for k in range(len(policies)) for j in range(len(chunks))]
  per_call = metrics.interleaved_latencies(lambda c: run(policies[c[0]], xs[c[1]], ys[c[1]]), calls,
                                           s["timing_runs"])
  seconds = [sum(per_call[k * len(chunks):(k + 1) * len(chunks)]) for k in range(len(policies))]
  timed_nfe = [float(np.mean(jax.device_get(run(r["policy"], x_T[:n], None if y is None else y[:n])[1])))
               for r in rows]
  by_target = {}
  for r in rows:
    by_target.setdefault(r["target_nfe"], {})[r["method"]] = r
  out_rows = []
  for r, sec, nfe_timed in zip(rows, seconds[1:], timed_nfe):
    group = by_target[r["target_nfe"]]
    row = {k: v for k, v in r.items() if k not in ("policy", "psnr_B", "ssim_B")}
    row.update({"psnr": float(np.mean(r["psnr_B"])), "psnr_std": float(np.std(r["psnr_B"])),
                "ssim": float(np.mean(r["ssim_B"])), "ssim_std": float(np.std(r["ssim_B"])),
                "nfe_ratio": steps / r["nfe"], "seconds": sec, "timed_nfe": nfe_timed,
                "speedup": seconds[0] / sec, "timed_nfe_ratio": steps / nfe_timed,
                "psnr_B": [float(v) for v in r["psnr_B"]]})
    for base in ("VDE", "Euler, fewer steps"):
      if base in group and group[base] is not r:
        row[f"vs {base}"] = {"psnr": paired(r["psnr_B"], group[base]["psnr_B"]),
                             "ssim": paired(r["ssim_B"], group[base]["ssim_B"])}
    out_rows.append(row)
  return {"model": name, "settings": s, "samples": samples, "cfg_scale": m["cfg_scale"],
          "shift": shift, "image_shape": list(m["shape"]), "num_classes": m["num_classes"],
          "info": m["info"], "teacache": calibration, "reference_seconds": seconds[0],
          "rows": out_rows, "device": jax.devices()[0].device_kind,
          "quality_seconds": t_quality - t0, "timing_seconds": time.perf_counter() - t_quality}


# ----------------------------------------------------------------------------------------------
# Verdicts


def rule_verdicts(results: dict, models=tuple(MODELS)) -> dict:
  """Each adaptive rule against fixed VDE (PSNR, WIN_SE paired errors) per model and target; the
  default rule is the one winning at two of three budgets on every model in `models` (the larger
  mean gain among several), else None."""
  table, winners = {}, []
  for label, method in RULES.items():
    per_model = {}
    for name, result in results.items():
      per_model[name] = {r["target_nfe"]: r["vs VDE"]["psnr"] for r in result["rows"]
                         if r["method"] == method}
    table[label] = per_model
    wins = [sum(v["verdict"] == "win" for v in per_model[name].values()) for name in models
            if name in per_model]
    needed = [(len(per_model[name]) * 2 + 2) // 3 for name in models if name in per_model]
    if wins and all(w >= k for w, k in zip(wins, needed)):
      gain = np.mean([v["diff"] for name in models for v in per_model[name].values()])
      winners.append((gain, label))
  return {"per_rule": table, "default": max(winners)[1] if winners else None}


def speed_excess(result: dict) -> float:
  """The largest measured speed-up above its timed policy's NFE ratio, as a fraction."""
  return max(r["speedup"] / r["timed_nfe_ratio"] for r in result["rows"]) - 1


# ----------------------------------------------------------------------------------------------
# Report


def plot(results: dict, path: str) -> None:
  """PSNR against NFE, one panel per model, one line per method."""
  from matplotlib.figure import Figure   # no pyplot: leaves a notebook's backend alone
  fig = Figure(figsize=(6 * len(results), 4.5))
  for ax, (name, result) in zip(np.atleast_1d(fig.subplots(1, len(results))), results.items()):
    for method in dict.fromkeys(row["method"] for row in result["rows"]):
      rows = sorted((r for r in result["rows"] if r["method"] == method), key=lambda r: r["nfe"])
      ax.plot([r["nfe"] for r in rows], [r["psnr"] for r in rows], marker="o", label=method)
    ax.set_xlabel("NFE (mean per sample)")
    ax.set_ylabel(f"PSNR vs {result['settings']['steps']}-step Euler (dB)")
    ax.set_title(name)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def _versus(row: dict, base: str) -> str:
  if f"vs {base}" not in row:
    return "—"
  d = row[f"vs {base}"]["psnr"]
  mark = {"win": " **win**", "loss": " loss", "tie": ""}[d["verdict"]]
  return f"{d['diff']:+.2f} ± {d['se']:.2f}{mark}"


def model_section(title: str, result: dict, description: str) -> list[str]:
  s = result["settings"]
  lines = [f"## {title}", "", description, "",
           "| method | setting | NFE | NFE ratio | speed-up (timed NFE) | PSNR (dB) | vs VDE (dB) | "
           "vs Euler, as many steps (dB) | SSIM |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|",
           f"| Euler (reference) | {s['steps']} steps | {s['steps']} | 1.00x | 1.00x "
           f"({result['reference_seconds']:.2f} s) | — | — | — | — |"]
  tc = result["teacache"]
  for r in sorted(result["rows"], key=lambda r: (-r["target_nfe"], r["method"] != "VDE")):
    method = r["method"]
    if method == "TeaCache" and tc and not tc["calibrated"]:
      method += " (uncalibrated)"
    lines.append(
        f"| {method} | {r['setting']} | {r['nfe']:.2f} | {r['nfe_ratio']:.2f}x | "
        f"{r['speedup']:.2f}x ({r['timed_nfe']:.1f}) | {r['psnr']:.2f} ± {r['psnr_std']:.2f} | "
        f"{_versus(r, 'VDE')} | {_versus(r, 'Euler, fewer steps')} | {r['ssim']:.4f} |")
  lines.append("")
  if tc:
    lines += [f"TeaCache's polynomial (degree {tc['degree']}), fitted on {tc['num_samples']} other "
              f"noises' full trajectories, constrained non-negative and non-decreasing over the observed "
              f"input changes [{tc['input_change_range'][0]:.3g}, {tc['input_change_range'][1]:.3g}]: "
              f"R^2 {tc['r2']:.3f} (unconstrained fit: {tc['plain_r2']:.3f}), RMSE {tc['rmse']:.4f} for "
              f"a mean output change of {tc['output_change_mean']:.4f} per step; "
              + ("calibrated." if tc["calibrated"] else
                 f"**uncalibrated** (R^2 < {calibrate.CALIBRATED_R2}): its rows do not stand for "
                 "TeaCache."), ""]
  lines += [f"Quality runs {result['quality_seconds']:.0f} s, timing {result['timing_seconds']:.0f} s; "
            f"the largest speed-up above its NFE ratio: {speed_excess(result):+.1%}.", ""]
  return lines


def dit_description(name: str, result: dict) -> str:
  info, s = result["info"], result["settings"]
  return (f"Model: {info['network']} ({info['params']:,} parameters, {info['train']['steps']} training "
          f"steps at shift {info['trained_shift']:g}, EMA parameters; `{info['workdir']}`), sampled "
          f"with CFG {result['cfg_scale']:g} (both branches cached and decomposed separately) at shift "
          f"{result['shift']:g}. {result['samples']} samples ({MODELS[name]['data']}), the same noise "
          f"for every row; PSNR / SSIM on images in [0, 1] against the {s['steps']}-step Euler output "
          f"(± the spread over samples; identical images count as {PSNR_CAP:g} dB).")


def testbed_description(result: dict) -> str:
  s = result["settings"]
  return (f"The exact rectified-flow velocity (`flowrl.cache.testbed`) of a mixture of "
          f"{TESTBED['components']} Gaussians (standard deviation {TESTBED['smoothing']:g}) centred on "
          f"sklearn's 8x8 digits scaled to [-1, 1], labelled by digit; exact CFG {result['cfg_scale']:g} "
          f"at shift {result['shift']:g}. {result['samples']} samples, labels 0-9 in turn; PSNR / SSIM "
          f"against the {s['steps']}-step Euler output. TeaCache's signal here is the input x itself "
          "(there are no blocks), so it is an input-level cache. The exact velocity costs little next to "
          "a DiT, so the speed-ups here mostly measure the policies' own overhead.")


def markdown(results: dict, regression: dict, verdicts: dict, preset: str, seconds: float) -> str:
  s = SETTINGS[preset]
  first = next(iter(results.values()))
  per_call = (("sample", "one sample") if s["timing_batch"] == 1
              else ("call", f"{s['timing_batch']} samples"))
  lines = [
      "# VDE: velocity decompose-and-estimate vs caching, at matched NFE", "",
      f"Written by `python -m experiments.tables.vde --preset {preset}` (this run: {seconds:.0f} s on "
      f"{first['device']}, training included). arXiv 2605.23381; the methods live in `flowrl/cache/`.",
      "", "![PSNR against NFE](vde_psnr_nfe.png)", "",
      "How to read the rows:",
      f"- Every row sits at its target NFE, the fixed VDE schedule's ({s['stable_step']} warm-up steps, "
      f"intervals {' / '.join(map(str, s['intervals']))}). Searched methods (threshold, tau or "
      "tolerance) were bisected on the evaluation samples themselves; their PSNR / SSIM per sample is "
      "interpolated linearly in NFE between the two settings bracketing the target (both shown).",
      f"- vs VDE / vs Euler: the mean paired PSNR difference against fixed VDE and against Euler with "
      f"as many steps, ± its standard error over the samples; **win** / loss: beyond {WIN_SE:g} "
      "standard errors, otherwise a tie.",
      f"- Speed: the NFE ratio ({s['steps']} / NFE) is the primary column. The measured speed-up is "
      f"the sum over the first {s['timing_samples']} samples of each {per_call[0]}'s minimum time over "
      f"{s['timing_runs']} interleaved rounds of the reference and every policy ({per_call[1]} per "
      "call, after compiling), of the setting timed "
      "(for a searched row the bracketing setting nearer its target, whose NFE on the timed samples "
      "is in brackets).",
      "- Every policy decides per sample. TeaCache keeps one accumulator per CFG branch and may "
      "compute one branch alone (1/2 NFE). EasyCache: k and the decision from the conditional branch "
      "as in its public code; warm-up 10 of 50 steps as published, and VDE's 7. FORA-style: the "
      f"blocks' residual reused for {FORA_PERIOD - 1} of every {FORA_PERIOD} steps.", ""]
  for name, result in results.items():
    if name == "testbed":
      lines += model_section(TESTBED["title"], result, testbed_description(result))
    else:
      lines += model_section(MODELS[name]["title"], result, dit_description(name, result))
  lines += ["## Adaptive intervals against the fixed schedule", "",
            "PSNR difference against fixed VDE (dB, ± paired standard error) per target NFE. (a) is "
            "the rule before issue 17 (anchors' alpha/beta speed); (b) sets the next interval from "
            "the relative error the estimate would have had at each full evaluation; (c) spreads the "
            "remaining budget (the target NFE) evenly, moved ±1 by that residual, with the largest "
            "tolerance at which it still spends the whole budget; (d) is fixed VDE with u "
            "re-orthogonalised to the current x, a deviation from the public code.", "",
            "| rule | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
  for label, per_model in verdicts["per_rule"].items():
    cells = []
    for name in results:
      cells.append("; ".join(f"{t}: {v['diff']:+.2f} ± {v['se']:.2f}"
                             + (f" {v['verdict']}" if v["verdict"] != "tie" else "")
                             for t, v in sorted(per_model[name].items(), reverse=True)))
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  lines += ["", ("Default adaptive rule: " + verdicts["default"] + " (it beats fixed VDE beyond "
                 f"{WIN_SE:g} standard errors at two of three budgets on both DiTs)."
                 if verdicts["default"] else
                 "No adaptive rule beats fixed VDE beyond 2 standard errors at two of three budgets on "
                 "both DiTs: none earns the default; the fixed schedule stays the recommendation."), ""]
  reg = regression
  cells = [f"interval {k}: {r['psnr']:.2f} dB at NFE {r['nfe']:g}"
           + (f" (before: {REGRESSION['psnr'][k]:.2f}, {r['psnr'] - REGRESSION['psnr'][k]:+.2f})"
              if reg["compared"] else "") for k, r in reg["by_interval"].items()]
  verdict = ((f" Within {REGRESSION['tolerance_db']} dB of the table before: "
              + ("yes." if reg["reproduced"] else "**no**.")) if reg["compared"] else
             " (The numbers before are the cpu preset's; not compared at this preset.)")
  lines += ["## Regression: the table before issue 17", "",
            f"Fixed VDE on the unconditional image_crops DiT at shift 1, no CFG ({reg['samples']} "
            f"samples against its {reg['steps']}-step Euler output), as `results/vde.md` had it "
            "before issue 17: " + "; ".join(cells) + "." + verdict, ""]
  lines += ["## The paper's numbers (Flux.1-dev, 50 steps, against its 50-step output)", "",
            "| method | NFE | speed-up | LPIPS | SSIM | PSNR (dB) |", "|---|---:|---:|---:|---:|---:|"]
  for r in PAPER_ROWS:
    lines.append(f"| {r['method']} | {r['nfe']} | {r['speedup']} | {r['lpips']} | {r['ssim']} | "
                 f"{r['psnr']} |")
  lines += ["", f"Other models (paper): {PAPER_OTHER}. No learned-feature distance (LPIPS) is computed "
            "here: no pretrained network is available for 16x16 digits or 32x32 crops.", ""]
  return "\n".join(lines)


def regression_check(preset: str, runs: str) -> dict:
  """The fixed VDE schedules on the unconditional image_crops DiT at shift 1, as before issue 17."""
  s = SETTINGS[preset]
  m = dit_model(preset, runs, REGRESSION["name"], REGRESSION["suffix"])
  result = run_model(m, s, REGRESSION["name"], s["samples"], searched=False)
  by_interval = {int(r["setting"].split()[-1]): {"psnr": r["psnr"], "nfe": r["nfe"]}
                 for r in result["rows"]}
  # The numbers before are the cpu preset's: other presets only run the check.
  reproduced = preset == "cpu" and all(
      abs(by_interval[k]["psnr"] - REGRESSION["psnr"][k]) <= REGRESSION["tolerance_db"] for k in by_interval)
  return {"samples": s["samples"], "by_interval": by_interval, "reproduced": bool(reproduced),
          "steps": s["steps"], "compared": preset == "cpu",
          "shift": result["shift"], "cfg_scale": result["cfg_scale"]}


def main(argv: list[str] | None = None) -> None:
  parser = table_parser(__doc__, "vde.md, vde.json and the plot")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  s = SETTINGS[args.preset]
  t0 = time.perf_counter()
  results = {}
  for name in s.get("models", MODELS):
    spec = MODELS[name]
    m = dit_model(args.preset, args.runs, name, spec["suffix"], spec["cfg_scale"], spec["shift"])
    results[name] = run_model(m, s, name, s["samples"])
  results["testbed"] = run_model(testbed_model(), s, "testbed", s["testbed_samples"])
  regression = regression_check(args.preset, args.runs)
  verdicts = rule_verdicts(results)
  seconds = time.perf_counter() - t0
  with open(os.path.join(args.out, "vde_teacache_coefficients.json"), "w") as f:
    json.dump({name: r["teacache"] for name, r in results.items()}, f, indent=2)
  plot(results, os.path.join(args.out, "vde_psnr_nfe.png"))
  with open(os.path.join(args.out, "vde.json"), "w") as f:
    json.dump({"preset": args.preset, "seconds": seconds, "models": results, "regression": regression,
               "rules": verdicts}, f, indent=2)
  with open(os.path.join(args.out, "vde.md"), "w") as f:
    f.write(markdown(results, regression, verdicts, args.preset, seconds))
  writers.log(f"wrote {args.out}/vde.md, vde.json, vde_psnr_nfe.png, vde_teacache_coefficients.json "
              f"in {seconds:.0f} s")


if __name__ == "__main__":
  main()
