"""Relay (arXiv 2605.22967): Sudoku exact match and NFE per objective, and block-diffusion code NFE.

  python -m experiments.tables.relay --preset cpu [--runs runs/tables] [--out results]

Trains `relay_sudoku` with each objective (mlm, rollout, relay_sg, relay) and `relay_code` without and
with the relay channel (rollout, relay) at the preset through `core.train.train` (finished runs are
reused), evaluates the EMA parameters, and writes `relay.md`, `relay.json`, `relay_sudoku_tau.png` and
`relay_code_tau.png` into --out.
Sudoku: exact match, cell accuracy, valid grids and mean NFE on the test puzzles at tau = 0.15, and a
tau sweep (accuracy vs NFE). Code: held-out token accuracy of each block given the true earlier blocks
(block 0 is the prompt), block exact match (all 8 bytes of a block right: a sequence-level score,
our stand-in for the paper's pass@1), and denoising rounds per block, over a sweep of the threshold tau.
"""
from __future__ import annotations

import json
import os
import time

import experiments.tasks  # noqa: F401,E402  (registers the tasks)
from core import data, metrics, train  # noqa: E402
from experiments import plots  # noqa: E402
from experiments.configs import relay_code, relay_sudoku  # noqa: E402
from experiments.training import read_report, table_parser, train_timed  # noqa: E402
from relay_jax import task as relay_task  # noqa: E402

SUDOKU_OBJECTIVES = ("mlm", "rollout", "relay_sg", "relay")
CODE_OBJECTIVES = ("rollout", "relay")
SUDOKU_TAUS = (0.05, 0.15, 0.25)
# tau = 0 reveals a whole block in one round (every confidence is > 0); 0.95 nearly one token a round.
CODE_TAUS = (0.0, 0.3, 0.5, 0.7, 0.85, 0.95)
# Held-out sequences for the code sweep (the test split has 1854 of 64 bytes; the cpu preset's run
# config evaluates 256 during training).
CODE_EVAL_SIZE = {"smoke": 16, "cpu": 1024, "paper": 1854}
NAMES = {"mlm": "MLM", "rollout": "Rollout", "relay_sg": "Relay-sg", "relay": "Relay"}
# The paper's Sudoku-Extreme exact match (%), tied embeddings (design doc relay.md).
PAPER_SUDOKU = {"mlm": 20.3, "rollout": 38.7, "relay_sg": 58.4, "relay": 62.7}
PAPER_CODE = "Fast-dLLM v2 1.5B on code: NFE 178.1 -> 130.7 (-27%) at equal HumanEval accuracy"


def nfe_at_accuracy(curve: list[dict], accuracy: float, key: str) -> float | None:
  """The NFE a tau sweep needs to reach `accuracy` (interpolated along the sweep sorted by NFE)."""
  pts = sorted((row["nfe"], row[key]) for row in curve)
  return metrics.first_crossing([n for n, _ in pts], [a for _, a in pts], accuracy)


def trained(config_module, preset: str, objective: str, workdir: str):
  """Trains (or reuses) the preset's run of `objective`; returns (timing, EMA params, config)."""
  config = config_module.get_config(preset)
  config.relay.objective = objective
  timing = train_timed(config, workdir)
  params, config = train.restore_params(workdir)
  return timing, params, config


def sudoku_rows(preset: str, runs: str) -> dict:
  out = {}
  for objective in SUDOKU_OBJECTIVES:
    timing, params, config = trained(relay_sudoku, preset, objective,
                                     os.path.join(runs, f"relay_sudoku_{objective}"))
    test = data.load_in_memory("sudoku", "test", config=config.data.config).arrays
    size = int(config.relay.eval_size)
    solver = relay_task.make_solver(config)
    sweep = []
    for tau in SUDOKU_TAUS:
      grids, nfe = solver(params, test["puzzle"][:size], tau)
      sweep.append({"tau": tau, **relay_task.sudoku_metrics(grids, test["solution"][:size], nfe)})
    out[objective] = {"train": timing, "sweep": sweep,
                      "at_0.15": next(r for r in sweep if r["tau"] == 0.15)}
  return out


def code_rows(preset: str, runs: str) -> dict:
  out = {}
  for objective in CODE_OBJECTIVES:
    timing, params, config = trained(relay_code, preset, objective,
                                     os.path.join(runs, f"relay_code_{objective}"))
    test = data.load_in_memory("stdlib_bytes", "test", config=f"l{config.data.seq_len}").arrays
    num_blocks, block_size = relay_task.code_shape(config)
    model = relay_task.build_model(config, relay_task.code_data.VOCAB_SIZE + 1,
                                   relay_task.code_data.MASK_ID)
    tokens = test["tokens"][:CODE_EVAL_SIZE[preset]]
    sweep = []
    for tau in CODE_TAUS:
      m = relay_task.code_token_accuracy(config, model, params, tokens, tau)
      sweep.append({"tau": tau, "accuracy": m["token_accuracy"],
                    "block_exact_match": m["block_exact_match"], "nfe": m["nfe_per_block"],
                    "blocks": len(tokens) * (num_blocks - 1)})
    out[objective] = {"train": timing, "sweep": sweep}
  return out


def nfe_saving(rows: dict, relay: str, baselines: tuple[str, ...], key: str) -> dict:
  """Relay's NFE against the best baseline's at the best baseline's accuracy at the default tau."""
  best = max(baselines, key=lambda o: max(r[key] for r in rows[o]["sweep"]))
  target = max(r[key] for r in rows[best]["sweep"])
  base_nfe = nfe_at_accuracy(rows[best]["sweep"], target, key)
  relay_nfe = nfe_at_accuracy(rows[relay]["sweep"], target, key)
  saving = None if relay_nfe is None else 1.0 - relay_nfe / base_nfe
  return {"baseline": best, "accuracy": target, "baseline_nfe": base_nfe, "relay_nfe": relay_nfe,
          "saving": saving}


def plot(rows: dict, panels: list[tuple[str, str]], xlabel: str, title: str, path: str) -> None:
  """One panel per (metric key, label): the metric against NFE along each objective's tau sweep."""
  fig, axes = plots.figure(len(panels))
  for ax, (key, ylabel) in zip(axes[0], panels):
    for objective, row in rows.items():
      pts = sorted(row["sweep"], key=lambda p: p["nfe"])
      ax.plot([p["nfe"] for p in pts], [p[key] for p in pts], "o-", label=NAMES[objective])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    # A sweep whose NFE hardly moves is shown over at least 2 NFE, flat.
    plots.readable(ax, min_span=(2.0, 0.02))
    ax.set_ylim(bottom=max(ax.get_ylim()[0], 0.0))       # fractions: nothing below 0
    ax.legend(fontsize=8)
  taus = sorted({p["tau"] for row in rows.values() for p in row["sweep"]})
  fig.suptitle(f"{title} (tau in {', '.join(f'{t:g}' for t in taus)})")
  plots.save(fig, path)


def _pct(x):
  return "n/a" if x is None else f"{100 * x:.1f}"


def markdown(preset: str, sudoku: dict, code: dict, sudoku_saving: dict, code_saving: dict,
             seconds: dict) -> str:
  cfg = relay_sudoku.get_config(preset)
  ccfg = relay_code.get_config(preset)
  lines = [
      "# Relay (arXiv 2605.22967) at CPU scale",
      "",
      f"Produced by `python -m experiments.tables.relay --preset {preset}` in "
      f"{sum(seconds.values()) / 60:.1f} minutes (training of runs not already finished included). "
      "EMA weights.",
      "",
      "## Sudoku",
      "",
      f"Model: width {cfg.model.width}, {cfg.model.depth} layers, {cfg.model.num_heads} heads, "
      f"{cfg.train.num_steps} steps at batch {cfg.train.global_batch_size} (the paper: width 384, "
      "4 layers, 300k steps at batch 512). Data: generated puzzles with unique solutions "
      f"(`sudoku/{cfg.data.config}`), not Sudoku-Extreme. Test puzzles: {cfg.relay.eval_size}. "
      "tau = 0.15, at most 64 rounds.",
      "",
      "| objective | exact match % | cell accuracy % | valid grids % | mean NFE | paper exact match % (Sudoku-Extreme) | train s |",
      "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for o in SUDOKU_OBJECTIVES:
    r = sudoku[o]["at_0.15"]
    lines.append(f"| {NAMES[o]} | {_pct(r['exact_match'])} | {_pct(r['cell_accuracy'])} | "
                 f"{_pct(r['valid'])} | {r['nfe']:.1f} | {PAPER_SUDOKU[o]} | "
                 f"{sudoku[o]['train']['seconds']:.0f} |")
  s = sudoku_saving
  lines += [
      "",
      f"NFE at equal exact match (tau sweep {SUDOKU_TAUS}, `relay_sudoku_tau.png`): "
      + ("no objective solved a test puzzle, so it is undefined at this scale." if not s["accuracy"]
         else f"the best baseline ({NAMES[s['baseline']]}) reaches {_pct(s['accuracy'])}% with "
         f"{s['baseline_nfe']:.1f} NFE; Relay "
         + ("never reaches it in the sweep." if s["relay_nfe"] is None else
            f"needs {s['relay_nfe']:.1f} NFE ({_pct(s['saving'])}% fewer).")),
      "",
      "## Block diffusion on code bytes",
      "",
      f"Model: width {ccfg.model.width}, {ccfg.model.depth} layers, {ccfg.train.num_steps} steps at "
      f"batch {ccfg.train.global_batch_size}; sequences of {ccfg.data.seq_len} bytes from the Python "
      f"standard library's sources, blocks of {ccfg.relay.block_size}, held-out files. Each block is "
      "generated from all-MASK given the true earlier blocks (block 0 is the prompt); KV cache exact.",
      "",
      "| model | tau | block exact match % (± s.e.) | token accuracy % | rounds per block |",
      "|---|---:|---:|---:|---:|",
  ]
  for o in CODE_OBJECTIVES:
    for r in code[o]["sweep"]:
      p, n = r["block_exact_match"], r["blocks"]
      lines.append(f"| {NAMES[o]} | {r['tau']} | {_pct(p)} ± {_pct((p * (1 - p) / n) ** 0.5)} | "
                   f"{_pct(r['accuracy'])} | {r['nfe']:.2f} |")
  lines.append("")
  for c, what in ((code_saving["block_exact_match"], "block exact match"),
                  (code_saving["accuracy"], "token accuracy")):
    lines.append(
        f"- At Rollout's best {what} ({_pct(c['accuracy'])}%, {c['baseline_nfe']:.2f} rounds per "
        "block) " + ("Relay never reaches it in the sweep." if c["relay_nfe"] is None else
                     f"Relay needs {c['relay_nfe']:.2f} rounds per block ({_pct(c['saving'])}% fewer)."))
  best = {o: max(code[o]["sweep"], key=lambda r: r["block_exact_match"]) for o in CODE_OBJECTIVES}
  diff = best["relay"]["block_exact_match"] - best["rollout"]["block_exact_match"]
  se = sum(r["block_exact_match"] * (1 - r["block_exact_match"]) / r["blocks"]
           for r in best.values()) ** 0.5
  resolved = abs(diff) >= 2 * se > 0
  lines += [
      f"- Relay's best block exact match minus Rollout's: {_pct(diff)} points, combined s.e. "
      f"{_pct(se)}" + ("." if resolved else ": not resolved at this sample size."),
      "- Block exact match is the sequence-level score, the closer analogue of the paper's pass@1. "
      "Token accuracy is a per-position score: it is highest when a whole block is revealed in one "
      "round (tau = 0), because each position then gets its own most likely byte; revealing in "
      "several rounds makes the bytes of a block agree with one another, which only a whole-block "
      "score rewards. The s.e. is the binomial one over blocks (blocks of one file are correlated, "
      "so it is optimistic).",
      f"- The paper: {PAPER_CODE}.",
  ]
  return "\n".join(lines) + "\n"


def plot_all(out: str, sudoku: dict, code: dict) -> None:
  plot(sudoku, [("exact_match", "exact match"), ("cell_accuracy", "cell accuracy")], "mean NFE",
       "Sudoku test puzzles: accuracy vs denoising rounds", os.path.join(out, "relay_sudoku_tau.png"))
  plot(code, [("block_exact_match", "block exact match"), ("accuracy", "token accuracy")],
       "rounds (NFE) per block", "Held-out code blocks", os.path.join(out, "relay_code_tau.png"))


def main(argv: list[str] | None = None) -> None:
  parser = table_parser(__doc__, "relay.md, relay.json and the plots", replot=True)
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  if args.replot:
    report = read_report(args.out, "relay.json")
    return plot_all(args.out, report["sudoku"], report["code"])
  t0 = time.perf_counter()
  sudoku = sudoku_rows(args.preset, args.runs)
  t1 = time.perf_counter()
  code = code_rows(args.preset, args.runs)
  seconds = {"sudoku": t1 - t0, "code": time.perf_counter() - t1}
  sudoku_saving = nfe_saving(sudoku, "relay", ("mlm", "rollout"), "exact_match")
  code_saving = {key: nfe_saving(code, "relay", ("rollout",), key)
                 for key in ("block_exact_match", "accuracy")}
  plot_all(args.out, sudoku, code)
  report = {"preset": args.preset, "seconds": seconds, "sudoku": sudoku, "code": code,
            "sudoku_nfe_saving": sudoku_saving,
            "code_nfe_saving": code_saving}
  with open(os.path.join(args.out, "relay.json"), "w") as f:
    json.dump(report, f, indent=1)
  with open(os.path.join(args.out, "relay.md"), "w") as f:
    f.write(markdown(args.preset, sudoku, code, sudoku_saving, code_saving, seconds))
  print(open(os.path.join(args.out, "relay.md")).read())


if __name__ == "__main__":
  main()
