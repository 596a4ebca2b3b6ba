"""Train-step throughput and memory of `flow_images` on this backend: one device, and 8 fake CPU devices.

  python -m experiments.bench_train [--preset cpu] [--steps 20] [--out results/bench_train.json]

Each setting runs in its own process (the fake-device flag must be set before jax starts). Peak memory
is the device allocator's peak where the backend reports it (GPU), else the compiled step's
argument + temporary + output bytes from XLA's memory analysis, beside the process's max RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CONFIG = "experiments/configs/flow_images.py"


def measure(preset: str, steps: int, mesh: dict) -> dict:
  import jax
  import numpy as np
  import experiments.tasks  # noqa: F401
  from core import sharding, train
  from experiments.main import load_config_module

  config = load_config_module(CONFIG).get_config(preset)
  mesh_ = sharding.make_mesh(mesh, devices=jax.devices()[:int(np.prod(list(mesh.values())))])
  run = train.setup(config, mesh_)
  data = run.task.train_data(0, 1)
  state = run.init(jax.random.PRNGKey(0))
  batches = [sharding.global_batch(next(data), mesh_) for _ in range(4)]
  compiled = run.step.lower(state, batches[0]).compile()
  for i in range(3):
    state, m = run.step(state, batches[i % 4])
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for i in range(steps):
    state, m = run.step(state, batches[i % 4])
  jax.block_until_ready((state, m))
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  stats = jax.devices()[0].memory_stats() or {}
  analysed = None if mem is None else int(mem.argument_size_in_bytes + mem.temp_size_in_bytes
                                          + mem.output_size_in_bytes)
  return {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
          "jax": jax.__version__, "devices": jax.device_count(), "mesh": dict(mesh_.shape),
          "preset": preset, "global_batch": int(config.train.global_batch_size),
          "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params))),
          "steps_per_s": steps / seconds, "examples_per_s": steps * config.train.global_batch_size / seconds,
          "peak_device_bytes": stats.get("peak_bytes_in_use"), "compiled_bytes": analysed,
          "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="cpu", help="flow_images preset (default cpu)")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--settings", default="1,8", help="comma list: 1 = one device, 8 = 8 fake CPU devices")
  p.add_argument("--out", default="results/bench_train.json")
  p.add_argument("--child", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    print(json.dumps(measure(args.preset, args.steps, json.loads(args.child))))
    return
  settings = {"1": ("1 device", {}, {"data": 1}),
              "8": ("8 fake CPU devices, data=4 x fsdp=2",
                    {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
                    {"data": 4, "fsdp": 2, "model": 1})}
  rows = []
  for name, env, mesh in (settings[k] for k in args.settings.split(",")):
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, **env}
    out = subprocess.run([sys.executable, "-m", "experiments.bench_train", "--preset", args.preset,
                          "--steps", str(args.steps), "--child", json.dumps(mesh)],
                         env=env, capture_output=True, text=True)
    if out.returncode:
      raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    rows.append({"setting": name, **json.loads(out.stdout.strip().splitlines()[-1])})
  mib = lambda b: "-" if b is None else f"{b / 2**20:.1f}"
  print(f"flow_images:{args.preset} train step ({rows[0]['params']:,} params, "
        f"global batch {rows[0]['global_batch']})")
  print(f"{'setting':<40} {'backend':<8} {'steps/s':>8} {'ex/s':>9} {'peak MiB':>9} {'XLA MiB':>8} {'RSS MiB':>8}")
  for r in rows:
    print(f"{r['setting']:<40} {r['backend']:<8} {r['steps_per_s']:>8.2f} {r['examples_per_s']:>9.1f} "
          f"{mib(r['peak_device_bytes']):>9} {mib(r['compiled_bytes']):>8} {mib(r['max_rss_bytes']):>8}")
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(rows, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
