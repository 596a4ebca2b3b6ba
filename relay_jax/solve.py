"""Solve Sudoku puzzles from a file with a trained `relay_sudoku` run.

  python -m relay_jax.solve --workdir RUN --puzzles FILE [--tau 0.15] [--out FILE]

FILE: one puzzle per line, n*n characters ('.' or '0' for blanks; n x n the run's grid size: 81 for
9x9, 36 for 6x6, 16 for 4x4), optionally a tab and the solution; further tab-separated columns (a
rating) are ignored. Bad lines (wrong length or size, bad characters, contradicting clues, a wrong
solution) are reported with their line number and skipped. Writes one
row per puzzle to --out (default FILE.solved), tab-separated under a '#' header:
  line  puzzle  answer  nfe  valid  correct
valid: 1 when the answer is a complete valid grid keeping every clue; correct: 1 / 0 against the
file's solution, '-' when the line has none. Prints the counts: puzzles, valid answers, exact
answers (of those with a solution), cell accuracy (all cells and blank cells) and mean NFE. Exit
status: 0 done, 1 no valid puzzle in the file, 2 bad arguments (a missing run or file).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from core import train
from relay_jax import sudoku, sudoku_data, task as relay_task


def _fail(message: str, status: int = 2):
  print(f"error: {message}", file=sys.stderr)
  raise SystemExit(status)


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a relay_sudoku run (its EMA weights are used)")
  parser.add_argument("--puzzles", required=True, help="puzzle file")
  parser.add_argument("--tau", type=float, default=0.15, help="the reveal budget per round")
  parser.add_argument("--out", default=None, help="output file (default: PUZZLES.solved)")
  args = parser.parse_args(argv)
  if not args.tau >= 0.0:
    _fail(f"--tau must be >= 0, got {args.tau}")
  if not os.path.isfile(args.puzzles):
    _fail(f"--puzzles {args.puzzles}: no such file")
  try:
    params, config = train.restore_params(args.workdir)
  except FileNotFoundError as e:
    _fail(f"--workdir {args.workdir}: {e}")
  if config.task != "relay_sudoku":
    _fail(f"--workdir {args.workdir} holds a {config.task!r} run, not relay_sudoku")

  rows, bad, ignored = [], 0, 0
  size = relay_task.sudoku_size(config)
  for line in sudoku_data.read_puzzle_file(args.puzzles, size):
    ignored = ignored or line.ignored_columns
    if isinstance(line.puzzle, ValueError):
      print(f"{args.puzzles}:{line.number}: skipped: {line.puzzle}", file=sys.stderr)
      bad += 1
    else:
      rows.append(line)
  if ignored:
    print(f"{args.puzzles}: columns after the solution are ignored", file=sys.stderr)
  if not rows:
    _fail(f"no valid puzzle in {args.puzzles} ({bad} bad lines)", status=1)

  puzzles = np.stack([r.puzzle for r in rows])
  grids, nfe = relay_task.make_solver(config)(params, puzzles, args.tau)
  clues = puzzles != 0
  valid = sudoku.valid_solutions(grids) & ((grids == puzzles) | ~clues).all(1)
  known = np.array([r.solution is not None for r in rows])
  correct = np.array([r.solution is not None and bool((g == r.solution).all())
                      for r, g in zip(rows, grids)])
  out = args.out or args.puzzles + ".solved"
  with open(out, "w") as f:
    f.write("#line\tpuzzle\tanswer\tnfe\tvalid\tcorrect\n")
    for r, puzzle, grid, n, v, c, k in zip(rows, puzzles, grids, nfe, valid, correct, known):
      f.write(f"{r.number}\t{sudoku.format_grid(puzzle)}\t{sudoku.format_grid(grid)}\t{int(n)}\t"
              f"{int(v)}\t{int(c) if k else '-'}\n")
  summary = {"puzzles": len(rows), "bad_lines": bad, "valid": int(valid.sum()),
             "with_solution": int(known.sum()), "exact": int(correct.sum()),
             "mean_nfe": float(np.mean(nfe))}
  text = (f"{summary['puzzles']} puzzles ({bad} bad lines skipped): {summary['valid']} valid "
          f"answers")
  if known.any():
    truth = np.stack([r.solution for r in rows if r.solution is not None])
    summary["cell_accuracy"] = float((grids[known] == truth).mean())
    blank = puzzles[known] == 0
    summary["blank_accuracy"] = float((grids[known] == truth)[blank].mean()) if blank.any() else 1.0
    text += (f"; {summary['exact']} of {summary['with_solution']} with a solution exactly right "
             f"(cell accuracy {summary['cell_accuracy']:.1%}, on blank cells "
             f"{summary['blank_accuracy']:.1%})")
  print(f"{text}; mean NFE {summary['mean_nfe']:.2f}")
  print(f"wrote {out}")
  return summary


if __name__ == "__main__":
  main()
