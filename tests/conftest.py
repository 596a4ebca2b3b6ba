"""Test-wide set-up: 8 fake CPU devices, XLA's LLVM optimisation off, a persistent compilation cache, and one seed for the suite.

Devices: the flag must be set before jax is imported anywhere, which is why it lives here.

Seeds: every randomized test takes its randomness from the fixtures `seed` (an int), `rng` (a numpy
Generator) or `key` (a JAX key), all derived from one suite seed and the test's id, so a test draws
the same inputs whatever else runs and in whichever order. The suite seed is fresh per run unless set
with `--seed N` (or `TEST_SEED=N`); it is printed in the header, and every failing randomized test
reports the command that replays it. `--seeds K` runs each randomized test under K suite seeds
(seed, seed + 1, ...): the flake check (`make test-flake`).
"""
import gc
import os
import re
import shlex
import sys
import zlib

_flags = os.environ.get("XLA_FLAGS", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
# XLA's LLVM optimisation off: the suite's programs are compiled far more often than they run long
# (compilation dominates most tests), and level 0 ran the in-process tests ~35% faster (the same 40
# tests of test_train, test_onestep and test_pid: 146 s -> 96 s on 2 cores). It changes how the code
# is optimised, not what it computes; the tables and benchmarks keep the default level.
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()

# Many tests start the CLI in subprocesses that compile the same small programs; a persistent
# compilation cache (inherited through the environment) compiles each once per machine.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_ROOT, ".cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

_SEED_FIXTURES = {"seed", "rng", "key"}
_SEED_ID = re.compile(r"\[suite_seed=\d+\]|(?<=\[)suite_seed=\d+-|-suite_seed=\d+")   # added by --seeds


def pytest_addoption(parser):
  group = parser.getgroup("seed", "suite seed")
  group.addoption("--seed", type=int, default=None,
                  help="suite seed every randomized test derives its inputs from "
                       "(default: $TEST_SEED, else fresh)")
  group.addoption("--seeds", type=int, default=1,
                  help="run every randomized test under this many suite seeds: seed, seed+1, ...")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: end-to-end tests left out of the quick tier "
                                     "(pytest -m 'not slow')")
  config.addinivalue_line("markers", "randomized: takes the seed, rng or key fixture (set "
                                     "automatically); make test-flake runs these under many seeds")
  workerinput = getattr(config, "workerinput", None)
  if workerinput is not None:            # an xdist worker: the controller chose the seed
    seed = workerinput["suite_seed"]
  else:
    seed = config.getoption("seed")
    if seed is None and os.environ.get("TEST_SEED"):
      seed = int(os.environ["TEST_SEED"])
    if seed is None:
      seed = int(np.random.SeedSequence().generate_state(1)[0] >> 1)
  config.suite_seed = int(seed)
  if config.getoption("seeds") < 1:
    raise pytest.UsageError(f"--seeds must be >= 1, got {config.getoption('seeds')}")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
  """xdist: every worker uses the controller's suite seed."""
  node.workerinput["suite_seed"] = node.config.suite_seed


def pytest_report_header(config):
  return f"suite seed: {config.suite_seed} (replay with --seed {config.suite_seed})"


def pytest_generate_tests(metafunc):
  count = metafunc.config.getoption("seeds")
  if count > 1 and _SEED_FIXTURES & set(metafunc.fixturenames):
    seeds = [metafunc.config.suite_seed + i for i in range(count)]
    metafunc.parametrize("suite_seed", seeds, ids=[f"suite_seed={s}" for s in seeds])


def pytest_collection_modifyitems(config, items):
  for item in items:
    if _SEED_FIXTURES & set(getattr(item, "fixturenames", ())):
      item.add_marker("randomized")


def _base_nodeid(nodeid):
  """The test's id without the suite seed --seeds adds: what the replay command selects."""
  return _SEED_ID.sub("", nodeid)


@pytest.fixture
def suite_seed(request):
  return request.config.suite_seed


@pytest.fixture
def seed(request, suite_seed):
  """This test's seed: a hash of the suite seed and the test's id (independent across tests)."""
  request.node.stash[_REPLAY] = suite_seed
  name = _base_nodeid(request.node.nodeid).encode()
  return int(np.random.SeedSequence([suite_seed, zlib.crc32(name)]).generate_state(1)[0] >> 1)


@pytest.fixture
def rng(seed):
  return np.random.default_rng(seed)


@pytest.fixture
def key(seed):
  import jax
  return jax.random.key(seed)


_REPLAY = pytest.StashKey[int]()


# Every program jax compiles stays loaded, a few memory maps each, until its caches are cleared: the
# flake check's hundreds of draws per worker otherwise reach the kernel's limit (vm.max_map_count,
# 65530) and the worker dies with a segfault inside XLA. So the caches are dropped when the maps near
# a third of it (the persistent compilation cache makes the recompiles cheap).
_MAPS_LIMIT = 20000
_tests_since_check = 0


def pytest_runtest_teardown(item):
  global _tests_since_check
  _tests_since_check += 1
  if _tests_since_check < 20 or "jax" not in sys.modules or not os.path.exists("/proc/self/maps"):
    return
  _tests_since_check = 0
  with open("/proc/self/maps") as f:
    if sum(1 for _ in f) > _MAPS_LIMIT:
      sys.modules["jax"].clear_caches()
      gc.collect()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  report = outcome.get_result()
  if report.failed and _REPLAY in item.stash:
    command = replay_command(item.stash[_REPLAY], item.nodeid)
    report.sections.append(("suite seed", f"suite seed {item.stash[_REPLAY]}; replay with\n  {command}"))
    report.user_properties.append(("replay", command))


def replay_command(suite_seed, nodeid):
  return f".venv/bin/python -m pytest --seed {suite_seed} {shlex.quote(_base_nodeid(nodeid))}"


def pytest_terminal_summary(terminalreporter):
  replays = [dict(r.user_properties)["replay"] for r in terminalreporter.stats.get("failed", [])
             if "replay" in dict(r.user_properties)]
  if replays:
    terminalreporter.section("replay the failed randomized tests")
    for command in replays:
      terminalreporter.write_line(command)
  terminalreporter.write_line(f"suite seed: {terminalreporter.config.suite_seed}")


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory, worker_id):
  """The session's shared smoke runs (tests/experiments/smoke.py), for the CLI, table and notebook tests."""
  from tests.experiments.smoke import SmokeRuns
  base = tmp_path_factory.getbasetemp()
  # Under xdist every worker has its own basetemp below one shared parent.
  return SmokeRuns(os.path.join(base.parent if worker_id != "master" else base, "shared_smoke_runs"))
