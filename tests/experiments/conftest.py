"""The session's shared smoke runs (tests/experiments/smoke.py)."""
import os

import pytest

from tests.experiments.smoke import SmokeRuns


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory, worker_id) -> SmokeRuns:
  base = tmp_path_factory.getbasetemp()
  # Under xdist every worker has its own basetemp below one shared parent.
  return SmokeRuns(os.path.join(base.parent if worker_id != "master" else base, "shared_smoke_runs"))
