"""VDE (arXiv 2605.23381) against caching baselines on two image DiTs: NFE, speed-up, PSNR / SSIM.

  python -m experiments.tables.vde --preset cpu [--runs runs/tables] [--out results]

For each model of MODELS, the class-conditional digits DiT of `experiments.tables.flow` (workdir
RUNS/digits_PRESET, CFG) and the unconditional image_crops DiT of `experiments.configs.flow_images`
(workdir RUNS/image_crops_PRESET, no CFG), both trained or reused through
`experiments.training.train_timed`: fits TeaCache's polynomial to the model (`flowrl.cache.calibrate`,
on noise other than the evaluation's), then samples the same noise with every policy of
`flowrl.cache.sampling`, CFG as the run was trained for. Each setting's quality is measured against
the full-step Euler output of the same seeds; thresholds of the adaptive methods are searched so that
their NFE matches VDE's fixed schedules. Writes vde.md (one section per model), vde.json (one block
per model), vde_psnr_nfe.png (one panel per model) and vde_teacache_coefficients.json (one fit per
model) into --out.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import experiments.tasks  # noqa: F401  (registers the tasks)
from core import flow_task, metrics, train, writers
from experiments.configs import flow_images
from experiments.training import table_parser, train_timed
from flowrl.cache import calibrate, sampling, vde

FORA_PERIOD = 3
# Identical images have infinite PSNR; the table caps it here.
PSNR_CAP = 100.0
# Per preset: Euler steps of the reference, VDE's stable_step and intervals (Flux: 6 and 3 / 4 / 5 of
# 50 steps), evaluation samples, the first samples that the NFE-matching search and the timing use,
# bisection steps of that search, and timed (reference, method) pairs per setting.
SETTINGS = {"smoke": {"steps": 12, "stable_step": 2, "intervals": [5], "samples": 2,
                      "subset": 2, "search_iters": 2, "repeats": 1},
            "cpu": {"steps": 50, "stable_step": 6, "intervals": [3, 4, 5], "samples": 64,
                    "subset": 16, "search_iters": 8, "repeats": 3},
            "paper": {"steps": 50, "stable_step": 6, "intervals": [3, 4, 5], "samples": 256,
                      "subset": 64, "search_iters": 10, "repeats": 5}}
# The table's models: the `flow_images` config argument is PRESET + suffix, the workdir
# RUNS/NAME_PRESET. `less` overrides SETTINGS[preset] for that model (keeps the whole cpu run short:
# the second model gets fewer bisection steps and timed pairs).
MODELS = {
    "digits": {"suffix": "", "less": {},
               "title": "Class-conditional digits DiT (CFG)",
               "data": "16x16x1 digits, labels 0-9 in turn"},
    "image_crops": {"suffix": ",image_crops", "less": {"cpu": {"search_iters": 6, "repeats": 2}},
                    "title": "Unconditional image_crops DiT (no CFG)",
                    "data": "32x32x3 photograph crops, unconditional"},
}
# Where the search for a threshold / tau / tolerance starts; it grows 4x until the NFE is low enough.
SEARCH_START = 1e-3
# The paper's Flux.1-dev rows against its 50-step output (design doc vde.md).
PAPER_ROWS = [
    {"method": "VDE (interval 5)", "nfe": "16", "speedup": "3.22x (code README: 3.01x on A100)",
     "lpips": "0.1997", "ssim": "0.8267", "psnr": "23.19"},
    {"method": "VDE (slow setting)", "nfe": "", "speedup": "2.21x", "lpips": "0.1243", "ssim": "",
     "psnr": ""}]
PAPER_OTHER = ("Qwen-Image: VDE LPIPS 0.0691 vs EasyCache-fast 0.1445 (-52%); Wan2.1: VDE LPIPS 0.0554 "
               "vs TeaCache 0.1277")


def model_settings(preset: str, name: str) -> dict:
  """SETTINGS[preset] with the model's reductions (MODELS[name]["less"]) applied."""
  return {**SETTINGS[preset], **MODELS[name]["less"].get(preset, {})}


def run_table(preset: str, runs: str, name: str = "digits") -> dict:
  """Every row of the table for the model MODELS[name]; its TeaCache fit is the result's "teacache"."""
  s = model_settings(preset, name)
  config = flow_images.get_config(preset + MODELS[name]["suffix"])
  workdir = os.path.join(runs, f"{name}_{preset}")   # digits: experiments.tables.flow's run
  t0 = time.perf_counter()
  trained = train_timed(config, workdir)
  t_trained = time.perf_counter()
  params, config = train.restore_params(workdir)
  model = flow_task.build_model(config)
  shape = flow_task.example_shape(config)
  cfg_scale, shift, steps = float(config.flow.cfg_scale), float(config.flow.sample_shift), s["steps"]
  num_classes = config.model.num_classes
  # Class-conditional: labels 0 .. num_classes - 1 in turn; unconditional: no labels.
  labels = lambda n: jnp.arange(n, dtype=jnp.int32) % num_classes if num_classes else None

  coefficients = calibrate.calibrate(
      model, params, jax.random.normal(jax.random.PRNGKey(1), (s["samples"], *shape)),
      y=labels(s["samples"]), num_steps=steps, cfg_scale=cfg_scale, shift=shift)

  # One sampler for every policy: the policy is an argument, so a searched threshold does not
  # recompile; decisions are made per sample, as the methods' code generates one image at a time.
  run = jax.jit(lambda params, policy, x, y: sampling.sample(
      model, params, x, steps, policy, y=y, cfg_scale=cfg_scale, shift=shift, per_sample=True))
  x_T = jax.random.normal(jax.random.PRNGKey(0), (s["samples"], *shape))
  y = labels(s["samples"])
  y_subset = None if y is None else y[:s["subset"]]
  on_subset = lambda policy: run(params, policy, x_T[:s["subset"]], y_subset)
  mean_nfe = lambda policy: float(on_subset(policy)[1].mean())
  # method: (the name of its searched setting, setting -> policy)
  searched = {"VDE-adaptive (ours)": ("tolerance", lambda p: sampling.vde_adaptive(p, s["stable_step"])),
              "TeaCache": ("threshold", lambda p: sampling.teacache(p, coefficients["coefficients"])),
              "EasyCache": ("tau", sampling.easycache)}

  reference = run(params, sampling.full(), x_T, y)[0]
  rows = [{"method": "Euler (reference)", "setting": f"{steps} steps", "target_nfe": steps,
           "nfe": float(steps), "speedup": 1.0}]

  def add(method, setting, policy, target, search=None):
    x, nfe_B = run(params, policy, x_T, y)
    ref_seconds, seconds = metrics.paired_latencies(on_subset, sampling.full(), policy, s["repeats"])
    rows.append({"method": method, "setting": setting, "target_nfe": target,
                 "nfe": float(nfe_B.mean()), "nfe_min": int(nfe_B.min()), "nfe_max": int(nfe_B.max()),
                 "seconds": seconds, "reference_seconds": ref_seconds, "speedup": ref_seconds / seconds,
                 **metrics.image_quality(x, reference, psnr_cap=PSNR_CAP),
                 **({"search": search} if search else {})})
    writers.log(f"{name}: {method} {setting}: NFE {rows[-1]['nfe']:.2f}, PSNR {rows[-1]['psnr']:.2f}, "
                f"{rows[-1]['speedup']:.2f}x")

  for interval in s["intervals"]:
    target = len(vde.full_step_indices(steps, s["stable_step"], interval))
    add("VDE", f"interval {interval}", sampling.vde(s["stable_step"], interval), target)
    for method, (setting_name, make) in searched.items():
      p, tried = calibrate.match_nfe(make, target, mean_nfe, s["search_iters"], start=SEARCH_START)
      add(method, f"{setting_name} {p:.4g}", make(p), target, {setting_name: p, "tried": tried})
    add("Euler, fewer steps", f"{target} steps", sampling.fewer_steps(target), target)
  fora_nfe = len(range(0, steps, FORA_PERIOD))
  add("FORA-style", f"every {FORA_PERIOD} steps", sampling.fora(FORA_PERIOD), fora_nfe)

  mc = config.model
  return {"model": name, "workdir": workdir, "preset": preset, "settings": s, "cfg_scale": cfg_scale,
          "guided": bool(num_classes) and cfg_scale != 1.0, "num_classes": int(num_classes),
          "shift": shift, "image_shape": list(shape), "train": trained,
          "network": f"DiT width {mc.width}, depth {mc.depth}, patch {mc.patch_size}",
          "params": metrics.param_count(params), "device": jax.devices()[0].device_kind,
          "teacache": coefficients, "rows": rows,
          # this model's share of the script's time, without (training or loading) its run
          "table_seconds": time.perf_counter() - t_trained, "train_call_seconds": t_trained - t0}


# ----------------------------------------------------------------------------------------------
# Report


def plot(results: dict, path: str) -> None:
  """PSNR against NFE, one panel per model, one line per method."""
  from matplotlib.figure import Figure   # no pyplot: leaves a notebook's backend alone
  fig = Figure(figsize=(6 * len(results), 4))
  for ax, (name, result) in zip(np.atleast_1d(fig.subplots(1, len(results))), results.items()):
    methods = dict.fromkeys(row["method"] for row in result["rows"][1:])
    for method in methods:
      rows = sorted((r for r in result["rows"] if r["method"] == method), key=lambda r: r["nfe"])
      ax.errorbar([r["nfe"] for r in rows], [r["psnr"] for r in rows], [r["psnr_std"] for r in rows],
                  marker="o", capsize=3, label=method)
    ax.set_xlabel("NFE (mean per sample)")
    ax.set_ylabel(f"PSNR vs {result['settings']['steps']}-step Euler (dB)")
    guidance = f"CFG {result['cfg_scale']:g}" if result["guided"] else "unconditional, no CFG"
    ax.set_title(f"{name} DiT, {guidance}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def model_description(result: dict) -> str:
  s = result["settings"]
  what = MODELS[result["model"]]
  if result["guided"]:
    model = (f"the class-conditional digits {result['network']} ({result['params']:,} parameters, "
             f"{result['train']['steps']} training steps) of `experiments/tables/flow.py`, EMA parameters, "
             f"CFG scale {result['cfg_scale']:g} (conditional and unconditional branches cached and "
             "decomposed separately)")
  else:
    model = (f"the unconditional {result['model']} {result['network']} ({result['params']:,} "
             f"parameters, {result['train']['steps']} training steps) of "
             f"`experiments/configs/flow_images.py:{result['preset']}{what['suffix']}`, EMA parameters, "
             "no CFG (one velocity branch, cached and decomposed as is)")
  return (f"Model: {model}. {s['samples']} samples ({what['data']}), the same noise for every row; "
          f"quality is measured against the {s['steps']}-step Euler output of the same noise: PSNR and "
          f"SSIM on images in [0, 1] (mean ± std over samples; identical images count as "
          f"{PSNR_CAP:g} dB). Every policy decides per sample. Adaptive settings bisected "
          f"{s['search_iters']} steps on the first {s['subset']} samples; speed-ups are medians of "
          f"{s['repeats']} timed pairs; this section took {result['table_seconds']:.0f} s after its "
          "model was trained or loaded.")


def model_section(result: dict) -> list[str]:
  """One model's heading, description, table, plot reference and reading."""
  rows = result["rows"]
  ref = rows[0]
  reference_seconds = statistics.median(r["reference_seconds"] for r in rows[1:])
  lines = [
      f"## {MODELS[result['model']]['title']}", "", model_description(result), "",
      "| method | setting | NFE | NFE ratio | speed-up | PSNR (dB) | SSIM |",
      "|---|---|---:|---:|---:|---:|---:|",
      f"| {ref['method']} | {ref['setting']} | {ref['nfe']:.0f} | 1.00x | 1.00x ({reference_seconds:.2f} s) "
      "| — | — |"]
  for r in rows[1:]:
    nfe = f"{r['nfe']:.1f}" if r["nfe_min"] != r["nfe_max"] else f"{r['nfe']:.0f}"
    lines.append(f"| {r['method']} | {r['setting']} | {nfe} | {ref['nfe'] / r['nfe']:.2f}x | "
                 f"{r['speedup']:.2f}x | {r['psnr']:.2f} ± {r['psnr_std']:.2f} | "
                 f"{r['ssim']:.4f} ± {r['ssim_std']:.4f} |")
  best = {}
  for r in rows[1:]:
    if r["method"] != "FORA-style":
      best.setdefault(r["target_nfe"], []).append(r)
  readings = []
  for target, group in sorted(best.items(), reverse=True):
    ranked = sorted(group, key=lambda r: -r["psnr"])
    rank = next(i for i, r in enumerate(ranked) if r["method"] == "VDE")
    versus = (f"next *{ranked[1]['method']}* {ranked[1]['psnr']:.2f} dB" if rank == 0 else
              f"VDE {ranked[rank]['psnr']:.2f} dB, {rank + 1} of {len(ranked)}")
    readings.append(f"at NFE {target} the best PSNR is *{ranked[0]['method']}*'s "
                    f"({ranked[0]['psnr']:.2f} dB; {versus})")
  tc = result["teacache"]
  lines += [
      "", "Reading: " + "; ".join(readings) + ".", "",
      f"TeaCache's polynomial (degree {tc['degree']}) was fitted to this model on {tc['num_samples']} "
      f"other noises' full trajectories: RMSE {tc['rmse']:.4f} for a mean output change of "
      f"{tc['output_change_mean']:.4f} per step (coefficients under `\"{result['model']}\"` in "
      "`vde_teacache_coefficients.json`).", ""]
  return lines


def speedup_excess(result: dict) -> float:
  """The largest speed-up above its NFE ratio, as a fraction."""
  rows = result["rows"]
  return max(r["speedup"] * r["nfe"] / rows[0]["nfe"] for r in rows[1:]) - 1


def markdown(results: dict, preset: str, seconds: float) -> str:
  first = next(iter(results.values()))
  s = first["settings"]
  lines = [
      "# VDE: velocity decompose-and-estimate vs caching", "",
      f"Written by `python -m experiments.tables.vde --preset {preset}` (this run of the script: "
      f"{seconds:.0f} s, on {first['device']}, models trained or reused included). arXiv 2605.23381; "
      "the methods live in `flowrl/cache/`. One section per model: "
      + ", ".join(MODELS[name]["title"] for name in results) + ".", "",
      "![PSNR against NFE](vde_psnr_nfe.png)", ""]
  for result in results.values():
    lines += model_section(result)
  less = {name: MODELS[name]["less"][preset] for name in results if MODELS[name]["less"].get(preset)}
  excess = ", ".join(f"{speedup_excess(r):+.0%} ({name})" for name, r in results.items())
  lines += [
      "## How the rows were made", "",
      f"- VDE: the released code's fixed schedule, stable_step {s['stable_step']}, intervals "
      f"{' / '.join(map(str, s['intervals']))}. VDE-adaptive (ours, `sampling.vde_adaptive`): "
      "re-anchors once the anchors' alpha/beta speed times the time since the last anchor exceeds a "
      "tolerance. TeaCache, EasyCache and VDE-adaptive have their threshold / tau / tolerance "
      f"bisected (geometrically, from {SEARCH_START:g}) on the first {s['subset']} samples so that "
      "their mean NFE is at most VDE's at that interval; the NFE shown is the mean over all samples "
      "(a range means samples differed). The ± after PSNR and SSIM is the spread over samples, "
      f"not an error of the mean (that is about std / {np.sqrt(s['samples']):.0f}); all rows of a "
      "model sample the same noise, so they are paired.",
      "- TeaCache's polynomial is fitted per model (`flowrl.cache.calibrate`). EasyCache: warm-up 2 "
      f"steps. FORA-style: the blocks' residual reused for {FORA_PERIOD - 1} of every {FORA_PERIOD} "
      "steps (FORA caches per layer).",
      "- Speed-up: the reference's latency over the method's, medians of the section's timed "
      "(reference, method) pairs after a compiling first call, in the same process, each call "
      f"sampling the first {s['subset']} samples one after another (`per_sample=True`); the "
      "reference's time in each table's first row is the median over its rows. NFE ratio: reference "
      "NFE / NFE, what the speed-up would be if only network evaluations cost time. Work outside the "
      "network (embedding, head and decisions at every step for TeaCache and FORA, the "
      "decomposition for VDE) pulls speed-ups below it, noise in the timings pushes them either "
      f"way: the largest speed-up above its NFE ratio here is {excess}."]
  if less:
    lines.append("- To keep the script's run time in check, "
                 + "; ".join(f"{name} uses " + ", ".join(f"{k} {v}" for k, v in d.items())
                             for name, d in less.items())
                 + f" instead of the preset's {', '.join(f'{k} {s[k]}' for k in next(iter(less.values())))}"
                 " (`MODELS[...]['less']` in the script).")
  lines += [
      "", "## The paper's numbers (Flux.1-dev, 50 steps, against its 50-step output)", "",
      "| method | NFE | speed-up | LPIPS | SSIM | PSNR (dB) |", "|---|---:|---:|---:|---:|---:|"]
  for r in PAPER_ROWS:
    lines.append(f"| {r['method']} | {r['nfe']} | {r['speedup']} | {r['lpips']} | {r['ssim']} | "
                 f"{r['psnr']} |")
  lines += ["", f"Other models (paper): {PAPER_OTHER}. No learned-feature distance (LPIPS) is computed "
            "here: no pretrained network is available for 16x16 digits or 32x32 crops.", ""]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = table_parser(__doc__, "vde.md, vde.json and the plot")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  t0 = time.perf_counter()
  results = {name: run_table(args.preset, args.runs, name) for name in MODELS}
  seconds = time.perf_counter() - t0
  with open(os.path.join(args.out, "vde_teacache_coefficients.json"), "w") as f:
    json.dump({name: r["teacache"] for name, r in results.items()}, f, indent=2)
  plot(results, os.path.join(args.out, "vde_psnr_nfe.png"))
  with open(os.path.join(args.out, "vde.json"), "w") as f:
    json.dump({"preset": args.preset, "seconds": seconds, "models": results}, f, indent=2)
  with open(os.path.join(args.out, "vde.md"), "w") as f:
    f.write(markdown(results, args.preset, seconds))
  writers.log(f"wrote {args.out}/vde.md, vde.json, vde_psnr_nfe.png, vde_teacache_coefficients.json "
              f"in {seconds:.0f} s")


if __name__ == "__main__":
  main()
