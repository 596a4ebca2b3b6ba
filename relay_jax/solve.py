"""Solve Sudoku puzzles from a file with a trained `relay_sudoku` run.

  python -m relay_jax.solve --workdir RUN --puzzles FILE [--tau 0.15] [--out FILE]

FILE: one puzzle per line, 81 characters ('.' or '0' for blanks), optionally a tab and the solution.
Bad lines (wrong length, bad characters, contradicting clues, a wrong solution) are reported with
their line number and skipped. Writes `line<TAB>solution<TAB>nfe` per solved puzzle to --out (default
FILE.solved) and prints exact match, cell accuracy, mean NFE and the fraction of valid grids (the
first two only over lines that carry a solution).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

import experiments.tasks  # noqa: F401  (registers the tasks)
from core import train
from relay_jax import sudoku, sudoku_data, task as relay_task


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a relay_sudoku run (its EMA weights are used)")
  parser.add_argument("--puzzles", required=True, help="puzzle file")
  parser.add_argument("--tau", type=float, default=0.15, help="the reveal budget per round")
  parser.add_argument("--out", default=None, help="output file (default: PUZZLES.solved)")
  args = parser.parse_args(argv)
  if not 0.0 <= args.tau:
    parser.error(f"--tau must be >= 0, got {args.tau}")
  params, config = train.restore_params(args.workdir)
  if config.task != "relay_sudoku":
    parser.error(f"--workdir {args.workdir} holds a {config.task!r} run, not relay_sudoku")

  lines, puzzles, solutions, bad = [], [], [], 0
  for number, puzzle, solution in sudoku_data.read_puzzle_file(args.puzzles):
    if isinstance(puzzle, ValueError):
      print(f"{args.puzzles}:{number}: skipped: {puzzle}", file=sys.stderr)
      bad += 1
      continue
    lines.append(number)
    puzzles.append(puzzle)
    solutions.append(solution)
  if not puzzles:
    print(f"no valid puzzle in {args.puzzles} ({bad} bad lines)", file=sys.stderr)
    return {"solved": 0, "bad_lines": bad}

  grids, nfe = relay_task.make_solver(config)(params, np.stack(puzzles), args.tau)
  out = args.out or args.puzzles + ".solved"
  with open(out, "w") as f:
    for number, grid, n in zip(lines, grids, nfe):
      f.write(f"{number}\t{sudoku.format_grid(grid)}\t{int(n)}\n")
  summary = {"solved": len(puzzles), "bad_lines": bad, "mean_nfe": float(np.mean(nfe)),
             "valid": float(sudoku.valid_solutions(grids).mean())}
  known = [i for i, s in enumerate(solutions) if s is not None]
  if known:
    truth = np.stack([solutions[i] for i in known])
    summary.update({"with_solution": len(known),
                    "exact_match": float((grids[known] == truth).all(1).mean()),
                    "cell_accuracy": float((grids[known] == truth).mean())})
  print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
  print(f"wrote {out}")
  return summary


if __name__ == "__main__":
  main()
