"""One process of the two-process test (3 train steps, then a checkpoint save/restore):
`python -m tests.core.multihost_worker PID NPROC PORT OUT SEED`.

NPROC=1 is the single-process reference. SEED seeds the initial parameters and the data order.
Each process owns 2 CPU devices; the mesh spans all of them.
"""
import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import numpy as np  # noqa: E402

import experiments.tasks  # noqa: E402,F401
from core import sharding, train  # noqa: E402
from experiments.configs import flow_2d  # noqa: E402


def main(pid: int, nproc: int, port: int, out: str, seed: int) -> None:
  if nproc > 1:
    sharding.initialize_distributed(f"localhost:{port}", nproc, pid)
  config = flow_2d.get_config("smoke")
  config.train.global_batch_size = 32
  config.seed = seed
  mesh = sharding.make_mesh({"data": -1}, devices=jax.devices()[:2] if nproc == 1 else None)
  run = train.setup(config, mesh)
  data = run.task.train_data(jax.process_index(), jax.process_count())
  state = run.init(jax.random.PRNGKey(seed))
  losses = []
  for _ in range(3):
    state, metrics = run.step(state, sharding.global_batch(next(data), mesh))
    losses.append(float(metrics["loss"]))
  sq_norm = jax.jit(lambda p: sum(jax.numpy.sum(x ** 2) for x in jax.tree.leaves(p)),
                    out_shardings=sharding.replicated(mesh))
  norm = float(sq_norm(state.params))
  # Every process saves its shards into one shared directory and restores them.
  ckpt = train.Checkpointer(os.path.join(os.path.dirname(out), f"run_{nproc}"), keep=1)
  ckpt.save(state, data.get_state(), {"train_seconds": 0.0})
  ckpt.wait()
  restored, data_state, _ = ckpt.restore(3, run.abstract_state, run.shardings)
  ckpt.close()
  with open(out, "w") as f:
    json.dump({"losses": losses, "param_sq_norm": norm, "processes": jax.process_count(),
               "devices": jax.device_count(), "restored_sq_norm": float(sq_norm(restored.params)),
               "restored_data_step": data_state["step"]}, f)


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
