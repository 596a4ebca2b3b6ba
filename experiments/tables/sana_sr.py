"""SANA-SR (arXiv 2605.23451): one-step 4x SR against bicubic, the multi-step sampler and the softmax twin.

  python -m experiments.tables.sana_sr --preset cpu [--runs runs/tables] [--out results]

Trains or reuses (experiments.training.train_timed) the runs sana_sr_<variant>_PRESET under RUNS
(experiments/configs/sana_sr.py: the DC-AE, the LinearDiT prior and its softmax twin, the one-step
model and its twin, the multi-step baseline, the pruned and the encoder-free one-step models, and the
one-step model with VSD). On the held-out photos' crops degraded with a fixed seed (Real-ESRGAN's
pipeline, `sr.degrade`): PSNR / SSIM on the Y channel against the original HR crop, NIQE, parameters
and MACs of the whole LR -> SR pipeline (the lowered HLO's cost analysis) and its latency on this
machine, end to end as OSEDiff's script times it (batch 1, warm-up, then timed runs). Then the DiT's
latency against resolution for linear and softmax attention (random weights), and the paper-scale
parameters and MACs at 512 px (experiments/bench_sr.py). Writes sana_sr.md, sana_sr.json,
sana_sr_latency.png and sana_sr_crops.png into --out.
"""
from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import experiments.tasks  # noqa: F401  (registers the tasks)
from core import flow_task, metrics, writers
from experiments import bench_sr, plots
from experiments.configs import sana_sr
from experiments.training import table_parser, train_timed, training_section, write_report
from sr import autoencoding, onestep

# Per preset: the SR runs in the table (their DC-AE and priors are trained on the way), held-out crops,
# timed runs, the DiT latency sweep's output sizes, and whether to count the paper-scale MACs.
SETTINGS = {
    "smoke": {"variants": ("onestep", "pruned", "encoder_free"), "eval": 2, "repeats": 2,
              "sweep": (64, 128), "paper_costs": False},
    "cpu": {"variants": ("multistep", "onestep", "onestep_vsd", "pruned", "encoder_free",
                         "onestep_softmax"), "eval": 28, "repeats": 20,
            "sweep": (128, 256, 512, 1024, 1536), "paper_costs": True},
    "paper": {"variants": ("multistep", "onestep", "onestep_vsd", "pruned", "encoder_free",
                           "onestep_softmax"), "eval": 64, "repeats": 100,
              "sweep": (512, 1024, 2048, 4096), "paper_costs": True},
}
LABELS = {"bicubic": "bicubic", "dcae_ceiling": "DC-AE reconstruction of the HR crop (the ceiling)", "multistep": "multi-step diffusion SR (the prior, conditioned)",
          "onestep": "one-step (LoRA)", "onestep_vsd": "one-step (LoRA) + VSD",
          "pruned": "one-step, pruned and re-tuned", "encoder_free": "encoder-free one-step (AdcSR-style)",
          "onestep_softmax": "one-step on the softmax-attention twin"}
PAPER = [
    "SANA-SR (abstract): 0.019 s per image, 407.95 G MACs, 344 M parameters; competitive with or "
    "better than OSEDiff and AdcSR on DIV2K-Val, RealSR and DRealSR.",
    "OSEDiff (one step, SD 2.1 + LoRA): RealSR PSNR 25.15 / SSIM 0.7341, DRealSR 27.92 / 0.7835; "
    "0.105 s at 512 px on an A100.",
    "AdcSR: 0.03 s for 128 -> 512 on an A100; -78% MACs and -74% parameters against OSEDiff.",
]


def run_name(variant: str, preset: str) -> str:
  return f"sana_sr_{variant}_{preset}"


def timed_ms(fn, *args, repeats: int) -> dict:
  """OSEDiff's protocol at our scale: 5 warm-up calls (the first compiles), then `repeats` timed
  ones; mean, median and min in ms."""
  for _ in range(5):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(1e3 * (time.perf_counter() - t0))
  return {"ms_mean": statistics.fmean(times), "ms_median": statistics.median(times), "ms_min": min(times)}


def niqe_mean(images) -> float | None:
  x = np.clip((np.asarray(images, np.float64) + 1) / 2, 0, 1)
  if min(x.shape[1:3]) < metrics.NIQE_BLOCK:
    return None
  return float(np.mean([metrics.niqe(img, data_range=1.0) for img in x]))


def evaluate(fn, pairs: dict, repeats: int) -> tuple[dict, np.ndarray]:
  """Quality over the eval crops (one crop per call, as timed) and the latency of one call."""
  out = np.concatenate([np.asarray(fn(pairs["lr"][i:i + 1])) for i in range(len(pairs["lr"]))])
  row = {**onestep.y_quality(out, pairs["hr"]), "niqe": niqe_mean(out),
         **timed_ms(fn, pairs["lr"][:1], repeats=repeats)}
  return row, out


def sr_rows(preset: str, runs: str, trained: dict) -> tuple[list[dict], dict]:
  s = SETTINGS[preset]
  rows, outputs, models = [], {}, {}
  config = sana_sr.get_config(preset)
  pairs = onestep.eval_pairs(config, s["eval"])
  lr_shape = (1, *pairs["lr"].shape[1:])
  bicubic = jax.jit(lambda lr: onestep.upsample(lr, int(config.sr.scale)))
  row, outputs["bicubic"] = evaluate(bicubic, pairs, s["repeats"])
  rows.append({"variant": "bicubic", "params": 0,
               "macs": metrics.flops(bicubic, jax.ShapeDtypeStruct(lr_shape, jnp.float32))["macs"], **row})
  # The ceiling of every DC-AE model: the HR crop encoded and decoded (the LR is not used).
  dcae_path = os.path.join(runs, run_name("dcae", preset))
  trained["dcae"] = train_timed(sana_sr.get_config(f"{preset},dcae"), dcae_path)
  ae = autoencoding.Frozen(dcae_path, int(config.dcae.train.num_steps), "the table's dcae run")
  recon = jax.jit(lambda x: ae.decode(ae.encode(x)))
  out = np.concatenate([np.asarray(recon(pairs["hr"][i:i + 1])) for i in range(len(pairs["hr"]))])
  rows.append({"variant": "dcae_ceiling", **onestep.y_quality(out, pairs["hr"]), "niqe": niqe_mean(out)})
  for variant in s["variants"]:
    path = os.path.join(runs, run_name(variant, preset))
    trained[variant] = train_timed(sana_sr.get_config(f"{preset},{variant}"), path)
    model, params, _ = onestep.load(path)
    params = jax.tree.map(jnp.asarray, params)
    models[variant] = (model, params)
    row, outputs[variant] = evaluate(jax.jit(lambda lr, m=model, p=params: m(p, lr)), pairs, s["repeats"])
    rows.append({"variant": variant, **onestep.costs(model, params, lr_shape), **row})
    writers.log(f"{variant}: PSNR {row['psnr']:.2f}, SSIM {row['ssim']:.3f}, {row['ms_median']:.1f} ms")
  for name in ("prior", "prior_softmax"):       # what the SR runs were built on
    if name != "prior_softmax" or "onestep_softmax" in s["variants"]:
      trained[name] = train_timed(sana_sr.get_config(f"{preset},{name}"),
                                  os.path.join(runs, run_name(name, preset)))
  return rows, {"pairs": pairs, "outputs": outputs, "models": models}


def attention_sweep(preset: str, repeats: int) -> list[dict]:
  """The prior's DiT (random weights, batch 1) at each output size of the sweep, linear and softmax."""
  config = sana_sr.get_config(f"{preset},prior")
  factor = 2 ** (len(config.dcae.model.widths) - 1)
  rows = []
  for attention in ("linear", "xla"):
    config.model.attention = attention
    model = flow_task.build_model(config)
    c = int(config.dcae.model.latent_channels)
    # Jitted: an eager init compiles each of its ops (seconds at the smoke sizes, for random weights).
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, c)), jnp.zeros((1,)))["params"]
    fn = jax.jit(lambda p, z: model.apply({"params": p}, z, jnp.full((1,), 0.999)))
    for size in SETTINGS[preset]["sweep"]:
      z = jax.random.normal(jax.random.PRNGKey(1), (1, size // factor, size // factor, c))
      rows.append({"attention": "linear" if attention == "linear" else "softmax", "size": size,
                   "tokens": (size // factor) ** 2, **timed_ms(fn, params, z, repeats=max(3, repeats // 4))})
      writers.log(f"DiT {attention} at {size} px: {rows[-1]['ms_median']:.1f} ms")
  return rows


def growth(rows: list[dict], attention: str) -> float:
  """The slope of log latency against log tokens over the two largest sizes (1: linear, 2: quadratic)."""
  pts = sorted((r["tokens"], r["ms_median"]) for r in rows if r["attention"] == attention)[-2:]
  return float(np.log(pts[1][1] / pts[0][1]) / np.log(pts[1][0] / pts[0][0]))


def latency_plot(rows: list[dict], path: str) -> None:
  """DiT latency against output size, log-log, one line per attention."""
  fig, axes = plots.figure()
  ax = axes[0, 0]
  for attention in ("linear", "softmax"):
    pts = sorted((r["size"], r["ms_median"]) for r in rows if r["attention"] == attention)
    ax.plot(*zip(*pts), marker="o", label=f"{attention} attention")
  ax.set(xscale="log", yscale="log", xlabel="output size (px, square)", ylabel="DiT latency (ms, median)",
         title="LinearDiT vs its softmax twin, batch 1")
  ax.grid(alpha=0.3, which="both")
  ax.legend()
  plots.save(fig, path)


def figure(crops: dict, path: str, variants, n: int = 4) -> None:
  """Rows: LR (nearest-upsampled), bicubic, each SR model, HR."""
  pairs, outs = crops["pairs"], crops["outputs"]
  k = pairs["hr"].shape[1] // pairs["lr"].shape[1]
  rows = [("LR", np.repeat(np.repeat(pairs["lr"][:n], k, 1), k, 2)), ("bicubic", outs["bicubic"][:n])]
  rows += [(v, outs[v][:n]) for v in variants] + [("HR", pairs["hr"][:n])]
  plots.sample_grid(np.concatenate([np.clip(r, -1, 1) for _, r in rows]), path, ncol=n,
                    row_labels=[name for name, _ in rows], title="SANA-SR 4x on held-out crops", ylabel="")


def _g(v):
  return "—" if v is None else f"{v / 1e9:.3f}"


def targets(result: dict) -> list[str]:
  """Each cpu-preset target of the reproduction, measured and marked met / not met (from the rows)."""
  by, out = {r["variant"]: r for r in result["rows"]}, []
  verdict = lambda ok: "met" if ok else "NOT met"
  one, bic = by.get("onestep"), by.get("bicubic")
  if one and bic:
    dp, ds = one["psnr"] - bic["psnr"], one["ssim"] - bic["ssim"]
    out.append(f"One-step beats bicubic clearly: PSNR {dp:+.2f} dB, SSIM {ds:+.4f}: "
               f"{verdict(dp > 0.5 and ds > 0)}.")
    if "dcae_ceiling" in by:
      c = by["dcae_ceiling"]
      out[-1] += (f" The DC-AE's own reconstruction of the HR crops reaches {c['psnr']:.2f} dB / "
                  f"{c['ssim']:.4f}: the most any model decoding through it can reach.")
  if one and "multistep" in by:
    m = by["multistep"]
    out.append(f"One-step within 0.5 dB of the multi-step sampler at a fraction of its latency: "
               f"{one['psnr'] - m['psnr']:+.2f} dB at {one['ms_median'] / m['ms_median']:.2f}x its "
               f"latency: {verdict(one['psnr'] >= m['psnr'] - 0.5 and one['ms_median'] < m['ms_median'])}.")
  if one and "pruned" in by and result["pruning"]:
    q, d = by["pruned"], result["pruning"]
    cut_p, cut_m = (1 - d[k][1] / d[k][0] for k in ("params", "macs"))
    out.append(f"Pruning cuts the DiT's params and MACs by at least 30% for at most 0.3 dB: "
               f"{100 * cut_p:.0f}% / {100 * cut_m:.0f}% for {q['psnr'] - one['psnr']:+.2f} dB: "
               f"{verdict(min(cut_p, cut_m) >= 0.3 and q['psnr'] >= one['psnr'] - 0.3)} (the whole "
               f"pipeline, DC-AE included: {100 * (1 - q['params'] / one['params']):.0f}% / "
               f"{100 * (1 - q['macs'] / one['macs']):.0f}%).")
  sizes = {r["size"] for r in result["sweep"]}
  if len(sizes) >= 4:
    lin, soft = growth(result["sweep"], "linear"), growth(result["sweep"], "softmax")
    out.append(f"Linear attention's latency grows linearly in pixels, the softmax twin's quadratically "
               f"(over {len(sizes)} sizes; slopes between the two largest): {lin:.2f} and {soft:.2f}: "
               f"{verdict(lin < 1.3 and soft > 1.5)}.")
  return out


def markdown(result: dict) -> str:
  s, preset = result["settings"], result["preset"]
  lines = [
      "# SANA-SR: one-step super-resolution with a DC-AE and a linear-attention DiT", "",
      f"Written by `python -m experiments.tables.sana_sr --preset {preset}` ({result['seconds']:.0f} s on "
      f"{result['device']}; training included only for runs not yet trained). "
      "arXiv 2605.23451; the method lives in `sr/`. "
      f"{s['eval']} held-out {result['hr_size']} px crops, degraded to {result['lr_size']} px by "
      "Real-ESRGAN's second-order pipeline with a fixed seed (trained on 64 px crops degraded on the "
      "fly); PSNR / SSIM on the Y channel against the original crop, NIQE (BasicSR's, lower = more "
      "natural), parameters and MACs of the whole LR -> SR pipeline (XLA's cost analysis of the lowered "
      f"HLO, at {result['hr_size']} px), latency end to end per image (batch 1, 5 warm-up calls, then "
      f"{s['repeats']} timed: median, mean).", "",
      "| method | params | GMACs | latency median / mean (ms) | PSNR-Y (dB) | SSIM-Y | NIQE |",
      "|---|---:|---:|---:|---:|---:|---:|"]
  for r in result["rows"]:
    niqe = "—" if r["niqe"] is None else f"{r['niqe']:.2f}"
    cost = (f"{r['params'] / 1e6:.2f} M | {_g(r['macs'])} | {r['ms_median']:.1f} / {r['ms_mean']:.1f}"
            if "params" in r else "— | — | —")
    lines.append(f"| {LABELS[r['variant']]} | {cost} | {r['psnr']:.2f} | {r['ssim']:.4f} | {niqe} |")
  by = {r["variant"]: r for r in result["rows"]}
  if "onestep" in by and "pruned" in by:
    p, q = by["onestep"], by["pruned"]
    lines += ["", f"Pruning (sr/prune.py): parameters {p['params'] / 1e6:.2f} M -> {q['params'] / 1e6:.2f} M "
              f"({100 * (1 - q['params'] / p['params']):.0f}% fewer), MACs {_g(p['macs'])} G -> "
              f"{_g(q['macs'])} G ({100 * (1 - q['macs'] / p['macs']):.0f}% fewer), PSNR "
              f"{q['psnr'] - p['psnr']:+.2f} dB. The DiT alone: {pruning_text(result['pruning'])}."]
  sweep = result["sweep"]
  lines += ["", "## Linear against softmax attention (the prior's DiT, random weights, batch 1)", "",
            "| output px | tokens | linear (ms) | softmax (ms) |", "|---:|---:|---:|---:|"]
  for size in s["sweep"]:
    lin, soft = (next(r for r in sweep if r["attention"] == a and r["size"] == size)
                 for a in ("linear", "softmax"))
    lines.append(f"| {size} | {lin['tokens']} | {lin['ms_median']:.1f} | {soft['ms_median']:.1f} |")
  lines += ["", f"Growth between the two largest sizes (slope of log latency in log tokens): linear "
            f"{growth(sweep, 'linear'):.2f}, softmax {growth(sweep, 'softmax'):.2f} (1 = linear, 2 = "
            "quadratic).", "", "![latency](sana_sr_latency.png)", "", "![crops](sana_sr_crops.png)"]
  if result.get("paper_costs"):
    lines += ["", "## At paper scale (512 px output, random weights; experiments/bench_sr.py)", "",
              "| pipeline | params | GMACs |", "|---|---:|---:|"]
    for name, c in result["paper_costs"].items():
      lines.append(f"| {name} | {c['params'] / 1e6:.1f} M | {c['macs'] / 1e9:.1f} |")
    lines += ["", "The paper's 407.95 G MACs (344 M parameters) cannot include a DC-AE encoder and full "
              "decoder (the `dcae` pipeline); the encoder-free pipeline (pixel_unshuffle + Linear, the "
              "19-block LinearDiT, the decoder at 0.5625 width) lands on it."]
  lines += ["", "## The issue's targets at this preset", ""] + [f"- {t}" for t in targets(result)]
  d = result["data"]
  lines += ["", f"Training data: degrading a batch of {d['batch']} HR crops on the host took "
            f"{d['degrade_ms']:.0f} ms, against {d['step_ms']:.0f} ms per one-step training step "
            f"({100 * d['degrade_ms'] / d['step_ms']:.0f}%, the batch made serially inside it).", ""]
  lines += training_section(result["trained"])
  lines += ["", "## The papers' figures", ""] + [f"- {p}" for p in PAPER] + [""]
  return "\n".join(lines)


def data_cost(preset: str, trained: dict) -> dict:
  """The host's time to degrade one training batch (`onestep.degraded_pairs`, median of 5) against
  the one-step run's time per training step (its training seconds over its steps; the loop makes
  its batches serially, so the degradation is inside that time)."""
  config = sana_sr.get_config(preset)
  it = onestep.degraded_pairs(config, 0, 1)
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    next(it)
    times.append(time.perf_counter() - t0)
  t = trained["onestep"]
  return {"batch": int(config.train.global_batch_size), "degrade_ms": 1e3 * statistics.median(times),
          "step_ms": 1e3 * t["seconds"] / t["steps"]}


def dit_pruning(models: dict) -> dict:
  """The DiT's parameters and MACs on an 8x8 latent before and after pruning (models: variant ->
  (model, params) as `sr_rows` loaded them)."""
  out = {}
  for variant in ("onestep", "pruned"):
    model, params = models[variant]
    dit = model.base if variant == "onestep" else params["dit"]
    z = jax.ShapeDtypeStruct((1, 8, 8, model.ae.config.model.latent_channels), jnp.float32)
    macs = metrics.flops(lambda p, x, m=model.dit: m.apply({"params": p}, x, jnp.ones((1,))), dit, z)["macs"]
    out[variant] = (metrics.param_count(dit), macs)
  (p0, m0), (p1, m1) = out["onestep"], out["pruned"]
  return {"params": [p0, p1], "macs": [m0, m1]}


def pruning_text(d: dict) -> str:
  (p0, p1), (m0, m1) = d["params"], d["macs"]
  return (f"{p0 / 1e6:.3f} M -> {p1 / 1e6:.3f} M parameters ({100 * (1 - p1 / p0):.0f}% fewer), "
          f"{m0 / 1e6:.1f} M -> {m1 / 1e6:.1f} M MACs on an 8x8 latent ({100 * (1 - m1 / m0):.0f}% fewer)")


def main(argv: list[str] | None = None) -> None:
  args = table_parser(__doc__, "sana_sr.md, sana_sr.json, sana_sr_latency.png and sana_sr_crops.png"
                      ).parse_args(argv)
  s = SETTINGS[args.preset]
  os.makedirs(args.out, exist_ok=True)
  t0 = time.perf_counter()
  trained = {}
  rows, crops = sr_rows(args.preset, args.runs, trained)
  sweep = attention_sweep(args.preset, s["repeats"])
  data = data_cost(args.preset, trained)
  pruning = dit_pruning(crops["models"]) if "pruned" in s["variants"] else {}
  paper = bench_sr.count(bench_sr.paper_models(), 512) if s["paper_costs"] else {}
  result = {"preset": args.preset, "settings": s, "seconds": time.perf_counter() - t0,
            "device": jax.devices()[0].device_kind, "hr_size": int(crops["pairs"]["hr"].shape[1]),
            "lr_size": int(crops["pairs"]["lr"].shape[1]), "rows": rows, "sweep": sweep,
            "pruning": pruning, "paper_costs": paper, "data": data, "trained": trained}
  latency_plot(sweep, os.path.join(args.out, "sana_sr_latency.png"))
  figure(crops, os.path.join(args.out, "sana_sr_crops.png"), s["variants"])
  write_report(args.out, "sana_sr", result, markdown(result))
  writers.log(f"wrote {args.out}/sana_sr.md, sana_sr.json and the plots in {result['seconds']:.0f} s")


if __name__ == "__main__":
  main()
