"""Precise (arXiv 2605.23522): SDE consistency of the sampler family, and GRPO with each sampler.

  python -m experiments.tables.precise --preset cpu [--runs runs/tables] [--out results] [--problems 2d,digits]

1. Consistency: the `flow_2d` double-ring model sampled by every method of flowrl.samplers at several
   noise levels and 10 / 20 / 50 / 200 NFE; energy distance (with a bootstrap spread) of the terminal
   samples to held-out data, beside the ODE's.
2. RL: `precise_2d` (reward: closeness to the outer ring) and `precise_digits` (reward: a classifier's
   log p(class | image)) trained with Flow-GRPO, DanceGRPO, CPS and Precise, each with its published
   recipe, over several seeds through core.train (finished runs are reused). Reward of 10-NFE ODE
   samples on fixed noises vs iteration and vs training seconds; final reward; iterations and seconds
   to reach the best baseline's final reward.
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
from experiments.configs import flow_2d, flow_images, precise_2d, precise_digits  # noqa: E402
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
# The paper (FLUX.1-dev, 10 NFE, 3000 iterations): PickScore, and Precise's savings.
PAPER_REWARD = {"flow_grpo": 23.242, "dance": 22.428, "cps": 23.670, "precise": 23.745}
PAPER_SAVINGS = "13.1-53.2% less wall-clock and 14.2-22.1% fewer iterations to the best baseline's reward"
# Per preset: consistency sample size, bootstrap resamples, NFEs and noise levels per method (smoke: the
# first of each list), and GRPO seeds.
SIZES = {"smoke": {"points": 256, "resamples": 2, "nfe": (10,), "etas": 1, "seeds": 1},
         "cpu": {"points": 2048, "resamples": 10, "nfe": CONSISTENCY_NFE, "etas": None, "seeds": 3},
         "paper": {"points": 4096, "resamples": 100, "nfe": CONSISTENCY_NFE, "etas": None, "seeds": 3}}


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


def grpo_config(problem: str, preset: str, sampler: str, seed: int, runs: str):
  module, _, base_name = PROBLEMS[problem]
  config = module.get_config(f"{preset},{sampler}")
  config.seed = seed
  config.grpo.base_workdir = os.path.abspath(os.path.join(runs, f"{base_name}_{preset}"))
  return config


def base_reward(config) -> dict:
  """The rewards of the untrained policy (the base model), measured by the task's own evaluator."""
  flowrl_task.prepare_base(config, None)
  task = train.build_task(config)
  with tempfile.TemporaryDirectory() as tmp:
    out = task.evaluate(task.init_params(jax.random.PRNGKey(0)), 0, tmp)
  return {"step": 0, "reward_ode": out["reward_ode"], "reward_sde": out["reward_sde"], "seconds": 0.0}


def curve(workdir: str) -> list[dict]:
  """[{step, reward_ode, reward_sde, seconds}] from a run's evaluations."""
  return [{"step": r["step"], "reward_ode": r["eval/reward_ode"], "reward_sde": r["eval/reward_sde"],
           "seconds": r["train_seconds"]}
          for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "eval/reward_ode" in r]


def rl(problem: str, preset: str, runs: str, seeds: int) -> dict:
  start = base_reward(grpo_config(problem, preset, "precise", 0, runs))
  out = {"base": start, "samplers": {}}
  for sampler in SAMPLERS:
    per_seed = []
    for seed in range(seeds):
      config = grpo_config(problem, preset, sampler, seed, runs)
      workdir = os.path.join(runs, f"precise_{problem}_{sampler}_s{seed}")
      train_timed(config, workdir)
      per_seed.append([start] + curve(workdir))
    steps = [p["step"] for p in per_seed[0]]
    ode = np.array([[p["reward_ode"] for p in c] for c in per_seed])
    secs = np.array([[p["seconds"] for p in c] for c in per_seed])
    out["samplers"][sampler] = {
        "steps": steps, "reward_ode_mean": ode.mean(0).tolist(), "reward_ode_std": ode.std(0).tolist(),
        "reward_sde_mean": np.mean([[p["reward_sde"] for p in c] for c in per_seed], 0).tolist(),
        "seconds_mean": secs.mean(0).tolist(), "final_per_seed": ode[:, -1].tolist()}
  rows = out["samplers"]
  best = max((s for s in SAMPLERS if s != "precise"), key=lambda s: rows[s]["reward_ode_mean"][-1])
  target = rows[best]["reward_ode_mean"][-1]
  for s in SAMPLERS:
    r = rows[s]
    r["to_target_steps"] = metrics.first_crossing(r["steps"], r["reward_ode_mean"], target)
    r["to_target_seconds"] = metrics.first_crossing(r["seconds_mean"], r["reward_ode_mean"], target)
  base = rows[best]
  for s in SAMPLERS:
    r = rows[s]
    r["step_saving"] = (None if r["to_target_steps"] is None
                        else 1 - r["to_target_steps"] / base["to_target_steps"])
    r["seconds_saving"] = (None if r["to_target_seconds"] is None
                           else 1 - r["to_target_seconds"] / base["to_target_seconds"])
  out.update({"best_baseline": best, "target": target})
  return out


# ----------------------------------------------------------------------------------------------
# Report


def plot(result: dict, path: str) -> None:
  problems = [p for p in PROBLEMS if p in result["rl"]]
  fig, axes = plt.subplots(len(problems), 2, figsize=(9, 3.2 * len(problems)), squeeze=False)
  for row, problem in zip(axes, problems):
    for sampler, r in result["rl"][problem]["samplers"].items():
      mean, std = np.array(r["reward_ode_mean"]), np.array(r["reward_ode_std"])
      for ax, x in ((row[0], r["steps"]), (row[1], r["seconds_mean"])):
        ax.plot(x, mean, label=NAMES[sampler])
        ax.fill_between(x, mean - std, mean + std, alpha=0.15)
    row[0].set_xlabel("iteration")
    row[1].set_xlabel("training seconds")
    for ax in row:
      ax.set_ylabel(f"{problem}: reward (10-NFE ODE)")
      ax.grid(alpha=0.3)
    row[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _fmt(x, spec=".1f", pct=False):
  if x is None:
    return "never"
  return f"{100 * x:{spec}}%" if pct else f"{x:{spec}}"


def _rl_table(problem: str, r: dict, preset: str, seeds: int) -> list[str]:
  module = PROBLEMS[problem][0]
  cfg = module.get_config(f"{preset},precise")
  rows = r["samplers"]
  lines = [f"Config `{module.__name__.split('.')[-1]}.py:{preset},<sampler>`: {cfg.train.num_steps} "
           f"iterations of {cfg.train.global_batch_size} groups x {cfg.grpo.group_size}, "
           f"{cfg.grpo.updates_per_batch} updates per sampled batch, {cfg.grpo.num_steps} NFE, reward "
           f"`{cfg.grpo.reward}`, {seeds} seeds (mean ± std). The base model scores "
           f"{r['base']['reward_ode']:.3f} (ODE) / {r['base']['reward_sde']:.3f} (Precise SDE). Target: "
           f"the best baseline's ({NAMES[r['best_baseline']]}) final mean reward, {r['target']:.3f}.", "",
           "| sampler | final reward (ODE) | per seed | final reward (own SDE) | iterations to target "
           "| seconds to target | fewer iterations | less wall-clock | paper PickScore |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
  for s in SAMPLERS:
    x = rows[s]
    lines.append(
        f"| {NAMES[s]} | {x['reward_ode_mean'][-1]:.3f} ± {x['reward_ode_std'][-1]:.3f} | "
        + ", ".join(f"{v:.3f}" for v in x["final_per_seed"]) + f" | {x['reward_sde_mean'][-1]:.3f} | "
        f"{_fmt(x['to_target_steps'], '.0f')} | {_fmt(x['to_target_seconds'], '.0f')} | "
        f"{_fmt(x['step_saving'], '.1f', True)} | {_fmt(x['seconds_saving'], '.1f', True)} | "
        f"{PAPER_REWARD[s]} |")
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
           "## SDE consistency on the double ring", "", *_consistency_table(result["consistency"]), ""]
  for problem, title in (("2d", "GRPO on the double ring (reward: outer ring)"),
                         ("digits", "GRPO on class-conditional digits (reward: classifier log p(class))")):
    if problem in result["rl"]:
      lines += [f"## {title}", "", *_rl_table(problem, result["rl"][problem], preset, result["seeds"]), ""]
  lines += ["Reward vs iteration and vs training seconds (mean ± std over seeds): "
            "![curves](precise_curves.png)", "",
            f"The paper (FLUX.1-dev, PickScore at 10 NFE after 3000 iterations): Precise 23.745, CPS 23.670, "
            f"Flow-GRPO 23.242, Dance-GRPO 22.428; {PAPER_SAVINGS}.", ""]
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
            "rl": {p: rl(p, args.preset, args.runs, sizes["seeds"]) for p in problems}}
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
