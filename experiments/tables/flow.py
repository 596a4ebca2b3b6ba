"""The base rectified-flow models that later methods reuse: 2-D double ring and class-conditional digits.

  python -m experiments.tables.flow --preset cpu [--runs runs/tables] [--out results]

Trains `flow_2d` and `flow_images` (digits, CFG) at the preset through `core.train.train` (a finished
run is reused), samples with the EMA parameters and writes `flow.md`, `flow.json`,
`flow_2d_samples.png` and `flow_digits_samples.png` into --out.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import experiments.tasks  # noqa: F401  (registers the tasks)
from core import flow_task, metrics, train, writers
from core.data import two_d
from experiments import plots
from experiments.configs import flow_2d, flow_images
from experiments.training import table_parser, train_timed
from flowrl import rewards

STEPS = (10, 20, 50)
CFG_SCALES = (1.0, 2.0, 4.0)
RING_TOLERANCE = 0.15
NUM_PROJECTIONS = 128
# Per preset: 2-D points per sample set (held-out eval has 8192, so two disjoint sets of up to 4096),
# bootstrap resamples for the spread, and digit samples per class.
EVAL_SIZES = {"smoke": {"points": 512, "resamples": 4, "per_class": 2},
              "cpu": {"points": 4096, "resamples": 20, "per_class": 10},
              "paper": {"points": 4096, "resamples": 100, "per_class": 100}}


# ----------------------------------------------------------------------------------------------
# Distances between point sets


def distances(x_NxD: np.ndarray, y_NxD: np.ndarray, resamples: int) -> dict[str, float]:
  return metrics.bootstrap_distances(x_NxD, y_NxD, resamples, num_projections=NUM_PROJECTIONS)


def ring_fraction(x_Nx2: np.ndarray) -> float:
  """Fraction of points whose radius is within RING_TOLERANCE of one of the double ring's radii."""
  radius_N = np.linalg.norm(x_Nx2, axis=1)
  gap_N = np.abs(radius_N[:, None] - np.asarray(two_d.RING_RADII)).min(axis=1)
  return float((gap_N < RING_TOLERANCE).mean())


# ----------------------------------------------------------------------------------------------
# Training and sampling


def sampler_at(config: ml_collections.ConfigDict, steps: int, cfg_scale: float = 1.0):
  """The jitted (params, x_T, y) -> x0 sampler of `config` with `steps` Euler steps and CFG `cfg_scale`."""
  config = config.copy_and_resolve_references()
  config.flow.sample_steps, config.flow.cfg_scale = steps, cfg_scale
  return flow_task.make_sampler(config)


def evaluate_2d(workdir: str, out_dir: str, sizes: dict) -> dict:
  """Distances of EMA samples at each of STEPS to held-out points, against the data floor and noise."""
  params, config = train.restore_params(workdir)
  n = sizes["points"]
  held_out = flow_task.model_inputs(config, config.data.eval_split)["x"]
  reference_Nx2, other_Nx2 = held_out[:n], held_out[n:2 * n]
  noise_Nx2 = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (n, 2)))
  row = lambda name, steps, x_Nx2: {"name": name, "steps": steps, "ring_fraction": ring_fraction(x_Nx2),
                                    **distances(x_Nx2, reference_Nx2, sizes["resamples"])}
  rows = [row("held-out data (floor)", None, other_Nx2), row("N(0, I) noise (untrained)", 0, noise_Nx2)]
  for steps in STEPS:
    samples_Nx2 = np.asarray(sampler_at(config, steps)(params, noise_Nx2, None))
    rows.append(row(f"Euler {steps} steps", steps, samples_Nx2))
  writers.save_image(flow_task.scatter_image(samples_Nx2, reference_Nx2),
                     os.path.join(out_dir, "flow_2d_samples.png"))
  return {"params": metrics.param_count(params), "points": n, "resamples": sizes["resamples"],
          "num_projections": NUM_PROJECTIONS, "rows": rows}


def evaluate_digits(workdir: str, out_dir: str, sizes: dict) -> dict:
  """Class consistency (by a classifier trained on real digits) and diversity of EMA samples per setting."""
  params, config = train.restore_params(workdir)
  test_set = flow_task.model_inputs(config, config.data.eval_split)
  # The digit classifier of the GRPO reward: a logistic regression on the train split.
  w, b = rewards.digit_classifier(config.data.config)
  predict = lambda x: np.argmax(x.reshape(len(x), -1) @ w + b, axis=-1)
  k = sizes["per_class"]
  labels_N = np.repeat(np.arange(config.model.num_classes), k)   # class-major: a grid row is one class
  noise = jax.random.normal(jax.random.PRNGKey(0), (len(labels_N), *test_set["x"].shape[1:]))
  # The trained config's own scale is always in the sweep: the sample grid shows it.
  scales = sorted(set(CFG_SCALES) | {float(config.flow.cfg_scale)})
  rows = []
  for steps in STEPS:
    for scale in scales:
      sampler = sampler_at(config, steps, scale)
      images = np.clip(np.asarray(sampler(params, noise, jnp.asarray(labels_N, jnp.int32))), -1.0, 1.0)
      rows.append({"steps": steps, "cfg_scale": scale,
                   "class_accuracy": float((predict(images) == labels_N).mean()),
                   "diversity": metrics.class_diversity(images, labels_N)})
      if steps == STEPS[-1] and scale == config.flow.cfg_scale:
        plots.sample_grid(
            images, os.path.join(out_dir, "flow_digits_samples.png"), ncol=k,
            row_labels=[str(c) for c in range(config.model.num_classes)], ylabel="conditioning class",
            title=f"digits DiT: {k} samples per class, {steps} Euler steps, CFG {scale:g}")
  return {"params": metrics.param_count(params), "num_classes": int(config.model.num_classes),
          "per_class": k, "num_samples": len(labels_N),
          "grid_steps": STEPS[-1], "grid_cfg_scale": float(config.flow.cfg_scale),
          "classifier_test_accuracy": float((predict(test_set["x"]) == test_set["y"]).mean()),
          "real_diversity": metrics.class_diversity(test_set["x"], test_set["y"]), "rows": rows}


# ----------------------------------------------------------------------------------------------
# Report


def _trained_table(result: dict) -> list[str]:
  lines = ["| model | config | network | params | steps | batch | EMA decay | train seconds "
           "| final eval loss |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
  for name, spec in (("flow_2d", "flow_2d.py"), ("digits", "flow_images.py")):
    model, t = result[name], result[name]["train"]
    seconds = f"{t['seconds']:.0f}"
    lines.append(f"| {name} | `{spec}:{result['preset']}` | {model['network']} | {model['params']:,} | "
                 f"{t['steps']} | {t['batch']} | {t['ema_decay']:g} | {seconds} "
                 f"| {t['final_eval']['eval/loss']:.4f} |")
  return lines


def _table_2d(f2d: dict) -> list[str]:
  rows = {row["steps"]: row for row in f2d["rows"]}
  floor, noise, last = rows[None], rows[0], rows[STEPS[-1]]
  lines = [f"{f2d['points']} samples (Euler from the same noise) vs {f2d['points']} held-out points; the "
           "floor compares two disjoint held-out sets of that size. ± is the std over "
           f"{f2d['resamples']} bootstrap resamples; sliced W1 uses {f2d['num_projections']} random "
           "directions.", "",
           f"| samples | energy distance | sliced W1 | within {RING_TOLERANCE} of a ring |",
           "|---|---:|---:|---:|"]
  for row in f2d["rows"]:
    lines.append(f"| {row['name']} | {row['energy']:.4f} ± {row['energy_std']:.4f} | "
                 f"{row['sw1']:.4f} ± {row['sw1_std']:.4f} | {row['ring_fraction']:.1%} |")
  energies = " / ".join(f"{rows[s]['energy']:.4f}" for s in STEPS)
  lines += ["", f"Energy distance to held-out data is {energies} at {' / '.join(map(str, STEPS))} Euler "
            f"steps, against {floor['energy']:.4f} between two held-out sets and {noise['energy']:.3f} for "
            f"noise; {last['ring_fraction']:.1%} of the {STEPS[-1]}-step samples lie within "
            f"{RING_TOLERANCE} of a ring ({floor['ring_fraction']:.1%} of held-out points)."]
  return lines


def _change(before: float, after: float, decimals: int) -> str:
  """How `after` compares with `before` at the precision the table prints."""
  before, after = round(before, decimals), round(after, decimals)
  return "raises" if after > before else "lowers" if after < before else "leaves unchanged"


def _table_digits(dig: dict) -> list[str]:
  real = dig["real_diversity"]
  lines = [f"{dig['per_class']} samples per class, the same noise for every setting. Class accuracy: how "
           "often the logistic-regression digit classifier of the GRPO reward (`flowrl.rewards`, fit on the digits train split) predicts the "
           f"conditioning class (on the real test split it is right {dig['classifier_test_accuracy']:.1%} "
           "of the time). Diversity: mean L2 distance between two images of the same class, averaged over "
           f"classes (real test digits: {real:.2f}).", "",
           "| Euler steps | CFG scale | class accuracy | diversity | diversity / real |",
           "|---:|---:|---:|---:|---:|"]
  for row in dig["rows"]:
    lines.append(f"| {row['steps']} | {row['cfg_scale']:g} | {row['class_accuracy']:.1%} | "
                 f"{row['diversity']:.2f} | {row['diversity'] / real:.2f} |")
  at_last = {row["cfg_scale"]: row for row in dig["rows"] if row["steps"] == STEPS[-1]}
  lo, hi = at_last[min(at_last)], at_last[max(at_last)]
  lines += ["", f"At {STEPS[-1]} steps, raising the CFG scale from {lo['cfg_scale']:g} to "
            f"{hi['cfg_scale']:g} {_change(lo['class_accuracy'], hi['class_accuracy'], 3)} class accuracy "
            f"({lo['class_accuracy']:.1%} -> {hi['class_accuracy']:.1%}; ceiling "
            f"{dig['classifier_test_accuracy']:.1%}, chance {1 / dig['num_classes']:.0%}) and "
            f"{_change(lo['diversity'] / real, hi['diversity'] / real, 2)} diversity "
            f"({lo['diversity'] / real:.2f} -> {hi['diversity'] / real:.2f} of real); over "
            f"{dig['num_samples']} samples an accuracy has a standard error of at most "
            f"{np.sqrt(0.25 / dig['num_samples']):.1%}."]
  return lines


def markdown(result: dict) -> str:
  """The results page: what was trained, the 2-D table and the digits table, with one reading of each."""
  dig = result["digits"]
  lines = ["# Base rectified-flow models", "",
           f"Written by `python -m experiments.tables.flow --preset {result['preset']}` (this run of the "
           f"script: {result['seconds']:.0f} s, training included only where it trained). Every model is "
           "evaluated with its EMA parameters; later methods reuse these two models.", "",
           "## What was trained", "", *_trained_table(result), "",
           "Train seconds: the trainer's own wall-clock of its training steps (compilation and "
           "checkpoints included, eval/sample hooks excluded; summed over resumptions).", "",
           "## flow_2d: samples vs held-out double-ring points", "", *_table_2d(result["flow_2d"]), "",
           "![flow_2d samples vs held-out data](flow_2d_samples.png)", "",
           "## digits: class consistency and diversity", "", *_table_digits(dig), "",
           f"![digit samples, one row per class, {dig['grid_steps']} steps, CFG {dig['grid_cfg_scale']:g}]"
           "(flow_digits_samples.png)", ""]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = table_parser(__doc__, "flow.md, flow.json and the figures")
  args = parser.parse_args(argv)
  t0 = time.perf_counter()
  sizes = EVAL_SIZES[args.preset]
  os.makedirs(args.out, exist_ok=True)
  result = {"preset": args.preset, "steps": list(STEPS), "cfg_scales": list(CFG_SCALES)}
  for name, config, evaluate in (("flow_2d", flow_2d.get_config(args.preset), evaluate_2d),
                                 ("digits", flow_images.get_config(args.preset), evaluate_digits)):
    workdir = os.path.join(args.runs, f"{name}_{args.preset}")
    trained = train_timed(config, workdir)
    mc = config.model
    network = (f"MLP width {mc.width}, depth {mc.depth}" if mc.kind == "mlp" else
               f"DiT width {mc.width}, depth {mc.depth}, patch {mc.patch_size}")
    result[name] = {"train": trained, "network": network, **evaluate(workdir, args.out, sizes)}
  result["seconds"] = time.perf_counter() - t0
  with open(os.path.join(args.out, "flow.json"), "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(args.out, "flow.md"), "w") as f:
    f.write(markdown(result))
  writers.log(f"wrote {args.out}/flow.md, flow.json, flow_2d_samples.png, flow_digits_samples.png "
              f"in {result['seconds']:.0f} s")


if __name__ == "__main__":
  main()
