"""Precise (arXiv 2605.23522): SDE consistency of the sampler family, and GRPO with each sampler.

  python -m experiments.tables.precise --preset cpu [--runs runs/tables] [--out results] [--problems 2d,digits]

1. Consistency: the `flow_2d` double-ring model sampled by every method of flowrl.samplers at several
   noise levels and 10 / 20 / 50 / 200 NFE; energy distance (with a bootstrap spread) of the terminal
   samples to held-out data, beside the ODE's.
2. RL: `precise_2d` (reward: closeness to the outer ring) and `precise_digits` (reward: a classifier's
   log p(class | image)) trained with Flow-GRPO, DanceGRPO, CPS and Precise under the matched recipe
   (one trainer, only the sampler and its noise level differ: Precise's public comparison) over paired
   seeds through core.train (finished runs are reused); the ring also with each sampler's published
   recipe. Every run is evaluated every few iterations by its own SDE at its training noise, the
   10-NFE ODE and the 40-NFE ODE on fixed noises; per evaluation: the final rewards and gains over
   step 0, iterations (and steady-state seconds) to the best baseline's final reward and to half its
   gain, per-seed gaps and a win / tie verdict.
Writes `precise.md`, `precise.json` and `precise_curves.png` into --out.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import experiments.tasks  # noqa: F401,E402  (registers the tasks)
from core import flow, flow_task, metrics, train, writers  # noqa: E402
from experiments.configs import _precise, flow_2d, flow_images, precise_2d, precise_digits  # noqa: E402
from experiments.training import read_jsonl, table_parser, train_timed  # noqa: E402
from flowrl import samplers, task as flowrl_task  # noqa: E402

SAMPLERS = ("flow_grpo", "dance", "cps", "precise")
NAMES = {"ode": "ODE (Euler)", "flow_grpo": "Flow-GRPO", "dance": "Dance-GRPO", "cps": "CPS",
         "precise": "Precise", "dance_precise": "Precise (Dance noise)"}
# Noise levels per method for the consistency table; the published default is in each list.
CONSISTENCY_ETAS = {"ode": (0.0,), "flow_grpo": (0.3, 0.7, 1.0), "dance": (0.3, 0.7, 1.0),
                    "cps": (0.5, 0.8), "precise": (0.5, 1.5, 3.0), "dance_precise": (0.3, 1.0)}
CONSISTENCY_NFE = (10, 20, 50, 200)
PROBLEMS = {"2d": (precise_2d, flow_2d.get_config, "flow_2d"),
            "digits": (precise_digits, flow_images.get_config, "digits")}
EVALS = {"reward_sde": "own SDE", "reward_ode": "ODE 10 NFE", "reward_ode_long": "ODE 40 NFE"}
# The paper (FLUX.2 Klein 4B, matched recipes, PickScore at 10 NFE after 3000 iterations), and
# Precise's savings against the best baseline.
PAPER_REWARD = {"flow_grpo": 23.242, "dance": 22.428, "cps": 23.670, "precise": 23.745}
PAPER_SAVINGS = "13.1-53.2% less wall-clock and 14.2-22.1% fewer iterations to the best baseline's reward"
# Per preset: consistency sample size, bootstrap resamples, NFEs and noise levels per method (smoke: the
# first of each list), GRPO seeds, and the problems also run with the published recipes.
# (smoke leaves the published recipes out: their runs differ from the matched ones only in config
# values, which tests/flowrl/test_grpo.py checks, and four more smoke runs would cost the suite a minute.)
SIZES = {"smoke": {"points": 256, "resamples": 2, "nfe": (10,), "etas": 1, "seeds": 1, "published": ()},
         "cpu": {"points": 2048, "resamples": 10, "nfe": CONSISTENCY_NFE, "etas": None, "seeds": 3,
                 "published": ("2d",)},
         "paper": {"points": 4096, "resamples": 100, "nfe": CONSISTENCY_NFE, "etas": None, "seeds": 3,
                   "published": ("2d", "digits")}}


# ----------------------------------------------------------------------------------------------
# 1. Consistency


def consistency(preset: str, runs: str, sizes: dict) -> dict:
  """Energy distance to held-out data of each (method, eta, NFE) on the flow_2d model."""
  workdir = os.path.join(runs, f"flow_2d_{preset}")
  train_timed(flow_2d.get_config(preset), workdir)
  params, config = train.restore_params(workdir)
  model = flow_task.build_model(config)
  n = sizes["points"]
  held_out = flow_task.model_inputs(config, config.data.eval_split)["x"][:n]
  x_T = jax.random.normal(jax.random.PRNGKey(0), (n, 2))
  velocity = lambda x, t: model.apply({"params": params}, x, t, None)
  run = jax.jit(lambda key, eta, grid, method: samplers.sample(velocity, x_T, grid, key, method=method,
                                                                eta=eta).x0, static_argnums=3)
  rows = []
  for method, etas in CONSISTENCY_ETAS.items():
    for eta in etas[:sizes["etas"]]:
      for nfe in sizes["nfe"]:
        x0 = np.asarray(run(jax.random.PRNGKey(nfe), eta, flow.time_grid(nfe), method))
        rows.append({"method": method, "eta": eta, "nfe": nfe,
                     **metrics.bootstrap_distances(x0, held_out, sizes["resamples"])})
  return {"points": n, "resamples": sizes["resamples"], "rows": rows}


# ----------------------------------------------------------------------------------------------
# 2. GRPO


def grpo_config(problem: str, preset: str, variant: str, seed: int, runs: str):
  module, _, base_name = PROBLEMS[problem]
  config = module.get_config(f"{preset},{variant}")
  config.seed = seed
  config.grpo.base_workdir = os.path.abspath(os.path.join(runs, f"{base_name}_{preset}"))
  return config


def step0_rewards(config) -> dict:
  """The untrained policy's (the base model's) rewards under `config`'s own evaluator: the ODE values
  are the same for every sampler, the own-SDE value is this sampler's at its noise level."""
  flowrl_task.prepare_base(config, None)
  task = train.build_task(config)
  with tempfile.TemporaryDirectory() as tmp:
    return task.evaluate(task.init_params(jax.random.PRNGKey(0)), 0, tmp)


def run_curve(workdir: str) -> dict:
  """A run's evaluations {"steps", "seconds", <eval key>: [...]} and its per-update clip statistics
  (means over the run's logged rows of clip_frac_u<k> and grad_frac_u<k>)."""
  rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  evals = [r for r in rows if "eval/reward_ode" in r]
  out = {"steps": [r["step"] for r in evals], "seconds": [r["train_seconds"] for r in evals],
         **{k: [r[f"eval/{k}"] for r in evals] for k in EVALS}}
  train_rows = [r for r in rows if "train/clip_frac" in r]
  out["clip"] = {k[6:]: float(np.mean([r[k] for r in train_rows])) for k in train_rows[0]
                 if k.startswith(("train/clip_frac_u", "train/grad_frac_u"))}
  return out


def steady_rate(steps, seconds) -> tuple[float, float]:
  """(steady-state seconds per iteration, start-up seconds) of a run's training clock: the slope
  between its first and last evaluations (the first comes after compilation), and what the first
  evaluation's clock holds beyond that slope (compilation, mostly)."""
  rate = (seconds[-1] - seconds[0]) / (steps[-1] - steps[0])
  return rate, seconds[0] - rate * steps[0]


def verdict(finals_a_S, finals_b_S) -> str:
  """Precise's (a) final rewards against the best baseline's (b), paired by seed [S >= 2]: "win" when
  a - b is positive in every seed and its mean exceeds 2 pooled standard deviations
  (sqrt((sd_a^2 + sd_b^2) / 2), each over seeds); "loss" for the mirror image; "tie" otherwise."""
  a, b = np.asarray(finals_a_S, np.float64), np.asarray(finals_b_S, np.float64)
  if a.shape != b.shape or a.size < 2:
    raise ValueError(f"need paired finals of >= 2 seeds; got shapes {a.shape} and {b.shape}")
  gaps_S = a - b
  pooled = float(np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2))
  mean = float(gaps_S.mean())
  if np.all(gaps_S > 0) and mean > 2 * pooled:
    return "win"
  if np.all(gaps_S < 0) and -mean > 2 * pooled:
    return "loss"
  return "tie"


def race(steps, curves_SxE, target: float) -> dict:
  """Iterations for reward curves [seeds, evaluations] (on the shared `steps`, step 0 first) to reach
  `target`: on the mean curve ("mean") and per seed ("per_seed"), linearly interpolated
  (core.metrics.first_crossing); None where a curve never reaches it."""
  curves_SxE = np.asarray(curves_SxE, np.float64)
  return {"mean": metrics.first_crossing(steps, curves_SxE.mean(0), target),
          "per_seed": [metrics.first_crossing(steps, c, target) for c in curves_SxE]}


def saving(mine, theirs):
  """1 - mine / theirs (e.g. fewer iterations than the best baseline), None when either is missing."""
  return None if mine is None or not theirs else 1 - mine / theirs


def rl(problem: str, preset: str, runs: str, seeds: int, recipe: str) -> dict:
  """Trains (or reuses) every sampler x seed of `recipe` on `problem` and compares them per evaluation."""
  out = {"recipe": recipe, "samplers": {}}
  for sampler in SAMPLERS:
    variant = sampler if recipe == "matched" else f"{sampler}_published"
    if _precise.recipe(variant)[2] == _precise.recipe(sampler)[2]:
      variant = sampler     # a published recipe equal to the matched one (Precise's): the same runs
    start = step0_rewards(grpo_config(problem, preset, variant, 0, runs))
    runs_S = []
    for seed in range(seeds):
      workdir = os.path.join(runs, f"precise_{problem}_{variant}_s{seed}")
      train_timed(grpo_config(problem, preset, variant, seed, runs), workdir)
      runs_S.append(run_curve(workdir))
    rates = [steady_rate(r["steps"], r["seconds"]) for r in runs_S]
    entry = {"steps": [0] + runs_S[0]["steps"], "step0": start,
             "seconds_per_iteration": float(np.mean([r for r, _ in rates])),
             "startup_seconds": float(np.mean([c for _, c in rates])),
             "clip": {k: float(np.mean([r["clip"][k] for r in runs_S])) for k in runs_S[0]["clip"]}}
    for key in EVALS:
      curves = np.array([[start[key]] + r[key] for r in runs_S])
      entry[key] = {"curves": curves.tolist(), "mean": curves.mean(0).tolist(),
                    "std": curves.std(0, ddof=1).tolist() if seeds > 1 else [0.0] * curves.shape[1],
                    "final": curves[:, -1].tolist()}
    out["samplers"][sampler] = entry
  rows = out["samplers"]
  out["comparison"] = {}
  for key in EVALS:
    best = max((s for s in SAMPLERS if s != "precise"), key=lambda s: rows[s][key]["mean"][-1])
    final_target = rows[best][key]["mean"][-1]
    start = rows[best][key]["mean"][0]
    mid_target = start + 0.5 * (final_target - start)       # half the best baseline's gain
    cmp = {"best": best, "final_target": final_target, "mid_target": mid_target, "samplers": {}}
    for s in SAMPLERS:
      r, c = rows[s], {}
      for name, target in (("final", final_target), ("mid", mid_target)):
        c[name] = race(r["steps"], r[key]["curves"], target)
      cmp["samplers"][s] = c
    p, b = cmp["samplers"]["precise"], cmp["samplers"][best]
    rate_p, rate_b = rows["precise"]["seconds_per_iteration"], rows[best]["seconds_per_iteration"]
    for name in ("final", "mid"):
      its_p, its_b = p[name]["mean"], b[name]["mean"]
      cmp[f"{name}_iteration_saving"] = saving(its_p, its_b)
      cmp[f"{name}_time_saving"] = saving(None if its_p is None else its_p * rate_p,
                                          None if its_b is None else its_b * rate_b)
      cmp[f"{name}_iteration_saving_per_seed"] = [saving(a, z) for a, z in zip(p[name]["per_seed"],
                                                                              b[name]["per_seed"])]
    finals_p, finals_b = rows["precise"][key]["final"], rows[best][key]["final"]
    cmp["gaps"] = (np.array(finals_p) - np.array(finals_b)).tolist()
    cmp["verdict"] = verdict(finals_p, finals_b) if seeds > 1 else "one seed"
    out["comparison"][key] = cmp
  return out


# ----------------------------------------------------------------------------------------------
# Report


def plot(result: dict, path: str) -> None:
  """Reward vs iteration and vs steady-state seconds (iterations x the sampler's seconds per
  iteration), one row per (problem, evaluation) of the matched recipe; mean ± std over seeds."""
  panels = [(p, key) for p in PROBLEMS if p in result["rl"] for key in EVALS]
  fig, axes = plt.subplots(len(panels), 2, figsize=(9, 2.8 * len(panels)), squeeze=False)
  for row, (problem, key) in zip(axes, panels):
    for sampler, r in result["rl"][problem]["matched"]["samplers"].items():
      mean, std = np.array(r[key]["mean"]), np.array(r[key]["std"])
      steps = np.array(r["steps"])
      for ax, x in ((row[0], steps), (row[1], steps * r["seconds_per_iteration"])):
        ax.plot(x, mean, label=NAMES[sampler])
        ax.fill_between(x, mean - std, mean + std, alpha=0.15)
    row[0].set_xlabel("iteration")
    row[1].set_xlabel("steady-state training seconds")
    for ax in row:
      ax.set_ylabel(f"{problem}: {EVALS[key]}", fontsize=8)
      ax.grid(alpha=0.3)
    row[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _fmt(x, spec=".1f", pct=False):
  if x is None:
    return "never"
  return f"{100 * x:{spec}}%" if pct else f"{x:{spec}}"


def _config_line(problem: str, preset: str, recipe: str, seeds: int) -> str:
  module = PROBLEMS[problem][0]
  cfg = module.get_config(f"{preset},precise" + ("" if recipe == "matched" else "_published"))
  g = cfg.grpo
  window = f"a {g.window_size}-step sliding SDE window" if g.window_size else "every step but the last"
  return (f"Config `{module.__name__.split('.')[-1]}.py:{preset},<sampler>"
          f"{'' if recipe == 'matched' else '_published'}`: {cfg.train.num_steps} iterations (optimiser "
          f"updates) of {cfg.train.global_batch_size} groups x {g.group_size}, {g.updates_per_batch} "
          f"updates per sampled batch, {g.num_steps} NFE at shift {g.shift:g}, trained on {window}, "
          f"lr {cfg.optim.lr:g}, reward `{g.reward}`; {seeds} paired seed{'s' * (seeds > 1)} (seed s: the "
          f"same conditions and initial parameters for every sampler), mean ± std over seeds.")


def _rl_tables(problem: str, r: dict, preset: str, seeds: int) -> list[str]:
  rows, recipe = r["samplers"], r["recipe"]
  lines = [_config_line(problem, preset, recipe, seeds), "",
           "Final rewards (step 0 → final, and the gain) per evaluation sampler; the clip fraction and "
           "the fraction of tokens still carrying gradient on the second (off-policy) update; "
           "steady-state seconds per iteration and start-up seconds (compilation) of the training clock.",
           "", "| sampler | eta | " + " | ".join(EVALS.values())
           + " | clipped (upd. 2) | with gradient (upd. 2) | s / it | start-up s |",
           "|---|---:|" + "---|" * len(EVALS) + "---:|---:|---:|---:|"]
  for s in SAMPLERS:
    x = rows[s]
    cfg = PROBLEMS[problem][0].get_config(f"{preset},{s}" + ("" if recipe == "matched" else "_published"))
    cells = [f"{x[k]['mean'][0]:.3f} → {x[k]['mean'][-1]:.3f} ± {x[k]['std'][-1]:.3f} "
             f"({x[k]['mean'][-1] - x[k]['mean'][0]:+.3f})" for k in EVALS]
    clip = x["clip"]
    lines.append(f"| {NAMES[s]} | {cfg.grpo.eta:g} | " + " | ".join(cells) + " | "
                 f"{_fmt(clip.get('clip_frac_u2'), '.1f', True)} | {_fmt(clip.get('grad_frac_u2'), '.1f', True)}"
                 f" | {x['seconds_per_iteration']:.3f} | {x['startup_seconds']:.1f} |")
  lines += ["", "Iterations to reach (a) the best baseline's final mean reward and (b) half its gain "
            "over step 0, on the mean curve [per seed]; Precise's saving against the best baseline in "
            "iterations and in steady-state time (iterations x seconds per iteration); Precise minus "
            "the best baseline in final reward per paired seed, and the verdict (a win needs the same "
            "sign in every seed and a mean gap over 2 pooled std).", "",
            "| evaluation | best baseline | target (a) | Precise its (a) | baseline its (a) | saving its / time (a) "
            "| target (b) | Precise its (b) | baseline its (b) | saving its / time (b) | final gap per seed | verdict |",
            "|---|---|---:|---|---|---:|---:|---|---|---:|---|---|"]
  its = lambda race_: f"{_fmt(race_['mean'], '.0f')} [" + ", ".join(_fmt(v, '.0f') for v in race_['per_seed']) + "]"
  for key, c in r["comparison"].items():
    p, b = c["samplers"]["precise"], c["samplers"][c["best"]]
    lines.append(
        f"| {EVALS[key]} | {NAMES[c['best']]} | {c['final_target']:.3f} | {its(p['final'])} | {its(b['final'])} | "
        f"{_fmt(c['final_iteration_saving'], '.1f', True)} / {_fmt(c['final_time_saving'], '.1f', True)} | "
        f"{c['mid_target']:.3f} | {its(p['mid'])} | {its(b['mid'])} | "
        f"{_fmt(c['mid_iteration_saving'], '.1f', True)} / {_fmt(c['mid_time_saving'], '.1f', True)} | "
        + ", ".join(f"{g:+.3f}" for g in c["gaps"]) + f" | {c['verdict']} |")
  return lines


def _claims(result: dict) -> list[str]:
  """One sentence per paper claim, per problem, on the matched recipe."""
  lines = []
  for problem in (p for p in PROBLEMS if p in result["rl"]):
    for key, c in result["rl"][problem]["matched"]["comparison"].items():
      best = NAMES[c["best"]]
      mean_gap = float(np.mean(c["gaps"]))
      reward = {"win": "reproduced", "tie": "tied", "loss": "not reproduced (Precise is worse)",
                "one seed": "one seed, no verdict"}[c["verdict"]]
      its, secs = c["final_iteration_saving"], c["final_time_saving"]
      speed = ("reproduced" if its is not None and secs is not None and its >= 0.142 and secs >= 0.131
               else "not reproduced")
      lines.append(f"- {problem}, {EVALS[key]}: best final reward: {reward} (Precise − {best} "
                   f"{mean_gap:+.3f}, per seed " + ", ".join(f"{g:+.3f}" for g in c["gaps"])
                   + f"); ≥ 14.2% fewer iterations and ≥ 13.1% less time to {best}'s final reward: "
                   f"{speed} ({_fmt(its, '.1f', True)} / {_fmt(secs, '.1f', True)}).")
  return lines


def _consistency_table(c: dict) -> list[str]:
  nfes = sorted({row["nfe"] for row in c["rows"]})
  lines = [f"Energy distance between {c['points']} terminal samples and as many held-out points (± std "
           f"over {c['resamples']} bootstrap resamples), same initial noise for every row; the SDE runs "
           "on every step but the last.", "",
           "| method | eta | " + " | ".join(f"{n} NFE" for n in nfes) + " |",
           "|---|---:|" + "---:|" * len(nfes)]
  by = {}
  for row in c["rows"]:
    by.setdefault((row["method"], row["eta"]), {})[row["nfe"]] = row
  for (method, eta), cells in by.items():
    lines.append(f"| {NAMES[method]} | {eta:g} | " + " | ".join(
        f"{cells[n]['energy']:.4f} ± {cells[n]['energy_std']:.4f}" for n in nfes) + " |")
  return lines


def markdown(result: dict) -> str:
  preset = result["preset"]
  lines = ["# Precise (arXiv 2605.23522) at CPU scale", "",
           f"Produced by `python -m experiments.tables.precise --preset {preset}` in "
           f"{result['seconds'] / 60:.1f} minutes (training of runs not already finished included).", "",
           f"The paper (FLUX.2 Klein 4B, matched recipes, PickScore at 10 NFE after 3000 iterations): "
           f"Precise {PAPER_REWARD['precise']}, CPS {PAPER_REWARD['cps']}, Flow-GRPO "
           f"{PAPER_REWARD['flow_grpo']}, Dance-GRPO {PAPER_REWARD['dance']}; {PAPER_SAVINGS}.", "",
           "## The paper's claims at our scale (matched recipe)", "", *_claims(result), "",
           "## SDE consistency on the double ring", "", *_consistency_table(result["consistency"]), ""]
  titles = {"2d": "the double ring (reward: outer ring)",
            "digits": "class-conditional digits (reward: classifier log p(class))"}
  for problem in (p for p in PROBLEMS if p in result["rl"]):
    for recipe, r in result["rl"][problem].items():
      what = ("the matched recipe (one trainer, only the sampler and eta differ)" if recipe == "matched"
              else "each sampler's published recipe")
      lines += [f"## GRPO on {titles[problem]}: {what}", "",
                *_rl_tables(problem, r, preset, result["seeds"]), ""]
  lines += ["Reward vs iteration and vs steady-state seconds, matched recipe, per evaluation sampler "
            "(mean ± std over seeds): ![curves](precise_curves.png)", ""]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = table_parser(__doc__, "precise.md, precise.json and the plot")
  parser.add_argument("--problems", default=",".join(PROBLEMS),
                      help=f"comma-separated GRPO problems to run, of {', '.join(PROBLEMS)}")
  args = parser.parse_args(argv)
  problems = args.problems.split(",")
  if not problems or any(p not in PROBLEMS for p in problems):
    parser.error(f"--problems must list some of {', '.join(PROBLEMS)}; got {args.problems!r}")
  t0 = time.perf_counter()
  sizes = SIZES[args.preset]
  os.makedirs(args.out, exist_ok=True)
  result = {"preset": args.preset, "seeds": sizes["seeds"],
            "consistency": consistency(args.preset, args.runs, sizes),
            "rl": {p: {recipe: rl(p, args.preset, args.runs, sizes["seeds"], recipe)
                       for recipe in ("matched", "published")
                       if recipe == "matched" or p in sizes["published"]} for p in problems}}
  result["seconds"] = time.perf_counter() - t0
  plot(result, os.path.join(args.out, "precise_curves.png"))
  with open(os.path.join(args.out, "precise.json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(args.out, "precise.md"), "w") as f:
    f.write(markdown(result))
  writers.log(f"wrote {args.out}/precise.md in {result['seconds']:.0f} s")
  print(open(os.path.join(args.out, "precise.md")).read())


if __name__ == "__main__":
  main()
