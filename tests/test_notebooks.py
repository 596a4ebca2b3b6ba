"""Every notebook in notebooks/ runs top to bottom in a fresh kernel of this venv, and is committed clean."""
import glob
import os
import sys

import nbformat
import pytest
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from tests.experiments.smoke import cli_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
CELL_TIMEOUT_S = 300


def test_python3_kernel_is_this_python():
  # jupyter_client swaps a kernelspec's bare `python` for sys.executable; a kernelspec naming another
  # interpreter would run the notebooks without this venv's packages.
  assert KernelManager(kernel_name="python3").format_kernel_cmd()[0] == sys.executable


# Finished smoke runs a notebook uses, handed to it as $SMOKE_RUNS (copies of the session's shared
# runs, with the runs they build on), so that it trains nothing: training is the CLI tests' subject.
BUILDS_ON = {"flow.ipynb": ("flow_2d_smoke",), "pid.ipynb": ("pid_x4_smoke",),
             "precise.ipynb": ("precise_2d_smoke",), "relay.ipynb": ("relay_sudoku_relay_s0",),
             "sana_sr.ipynb": ("sana_sr_onestep_smoke",), "vde.ipynb": ("digits_smoke",)}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_without_error(path, tmp_path, smoke_runs):
  nb = nbformat.read(path, as_version=4)
  dirty = [i for i, cell in enumerate(nb.cells)
           if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
  assert not dirty, f"{path}: clear the outputs of cells {dirty} before committing"
  # One CPU device: the 8 fake devices of conftest would only slow the notebook's training down.
  env = cli_env()
  if os.path.basename(path) in BUILDS_ON:
    for run in BUILDS_ON[os.path.basename(path)]:
      smoke_runs.copy(run, tmp_path, with_needed=True)
    env["SMOKE_RUNS"] = str(tmp_path)
  client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                          resources={"metadata": {"path": ROOT}})   # the kernel starts in the repo root
  client.execute(env=env)   # raises CellExecutionError, naming the cell, on the first error
