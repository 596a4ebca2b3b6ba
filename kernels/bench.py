"""Times the Pallas kernels against their XLA references and against the device's copy bandwidth.

  python -m kernels.bench [--out FILE.json] [--iters 20] [--sizes paper|small] [--no-sweep]

Per shape it prints, for the forward pass and for forward + backward: the median time, the bytes that
must move at least (inputs read once, outputs written once), the achieved GB/s, that as a percentage
of the copy bandwidth measured in the same run (XLA's `x * 1.5` over 1 GiB, read + write), and the
kernel's speedup over the reference. The per-channel gate is a matmul, so its TFLOP/s is printed too.
On a GPU it also tries a few tile sizes and warp counts (SWEEPS) and reports each. On a CPU the kernels run only
in interpret mode, a correctness tool: it checks them against the reference at a small size and
reports them as not timed; the reference is timed at reduced sizes.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels import common
from kernels import linear_attention as la
from kernels import sigma_gate as sg

PAPER_SIZES = dict(attention=dict(B=4, H=36, D=32, N=(1024, 4096, 16384, 65536)),
                   gate=dict(B=1, N=16384, D=1536, G=(1536, 1)))
SMALL_SIZES = dict(attention=dict(B=2, H=4, D=32, N=(1024, 4096)),
                   gate=dict(B=1, N=1024, D=256, G=(256, 1)))
# Kernel tilings tried on a GPU (the first is the kernel's default), passed as `block_sizes`.
BS = common.BlockSizes
SWEEPS = dict(
    attention=[la.DEFAULT_BLOCKS, BS(rows=64, num_warps=4), BS(rows=256, num_warps=4),
               BS(rows=256, num_warps=8)],
    gate=[sg.DEFAULT_BLOCKS, BS(rows=32, num_warps=4), BS(rows=128, num_warps=4),
          BS(rows=128, num_warps=8)])


def median_seconds(fn, *args, iters: int, warmup: int = 3) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def copy_bandwidth(iters: int) -> float:
  """Bytes per second of XLA's elementwise x * 1.5 (read + write), the practical memory roofline."""
  n = (1 << 28) if common.on_gpu() else (1 << 24)
  x = jnp.ones((n,), jnp.float32)
  return 2 * 4 * n / median_seconds(jax.jit(lambda a: a * 1.5), x, iters=iters)


def forward_and_grads(f):
  """(inputs..., cotangent) -> (output, input gradients): what one training step asks of an op."""
  def run(*args):
    *inputs, ct = args
    out, vjp = jax.vjp(f, *inputs)
    return out, vjp(ct)
  return jax.jit(run)


def relative_error(a, b) -> float:
  a, b = (np.asarray(jnp.asarray(t, jnp.float32)) for t in (a, b))
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def attention_cases(sizes, key):
  s = sizes["attention"]
  for n in s["N"]:
    ks = jax.random.split(jax.random.fold_in(key, n), 4)
    shape = (s["B"], n, s["H"], s["D"])
    q, k, v, ct = (jax.random.normal(kk, shape, jnp.bfloat16) for kk in ks)
    unit = q.size * q.dtype.itemsize
    yield dict(op="linear_attention", shape=f"B={s['B']} N={n} H={s['H']} D={s['D']} bf16",
               fn=lambda impl, blocks=la.DEFAULT_BLOCKS: (
                   lambda q, k, v: la.linear_attention(q, k, v, impl=impl, block_sizes=blocks)),
               args=(q, k, v), ct=ct, bytes_fwd=4 * unit, bytes_fwd_bwd=11 * unit, flops_fwd=None)


def gate_cases(sizes, key):
  s = sizes["gate"]
  b, n, d = s["B"], s["N"], s["D"]
  for g in s["G"]:
    ks = jax.random.split(jax.random.fold_in(key, g), 6)
    x, lq, ct = (jax.random.normal(kk, (b, n, d), jnp.bfloat16) for kk in ks[:3])
    w = (0.02 * jax.random.normal(ks[3], (2 * d, g))).astype(jnp.bfloat16)
    bias = jnp.full((g,), 2.0, jnp.bfloat16)
    sigma = jax.random.uniform(ks[4], (b,), maxval=0.8)
    log_alpha = jnp.float32(np.log(5.0))
    unit = x.size * x.dtype.itemsize
    w_bytes = w.size * w.dtype.itemsize
    yield dict(op=f"sigma_gate G={'D' if g == d else 1}", shape=f"B={b} N={n} D={d} G={g} bf16",
               fn=lambda impl, blocks=sg.DEFAULT_BLOCKS: (
                   lambda x, lq, sigma, w, bias, log_alpha: sg.sigma_gate(
                       x, lq, sigma, w, bias, log_alpha, impl=impl, block_sizes=blocks)),
               args=(x, lq, sigma, w, bias, log_alpha), ct=ct,
               bytes_fwd=3 * unit + w_bytes, bytes_fwd_bwd=8 * unit + 2 * w_bytes,
               flops_fwd=2 * b * n * 2 * d * g)


def time_case(case, impl, iters, blocks=None):
  fn = case["fn"](impl) if blocks is None else case["fn"](impl, blocks)
  fwd = jax.jit(fn)
  out = fwd(*case["args"])
  t_fwd = median_seconds(fwd, *case["args"], iters=iters)
  fb = forward_and_grads(fn)
  t_fb = median_seconds(fb, *case["args"], case["ct"], iters=iters)
  return out, t_fwd, t_fb


def bench_case(case, sweep, bandwidth, iters, timed_kernel):
  """One shape: the reference's times, then the kernel's for each BlockSizes of the sweep."""
  rows = []
  ref_out, ref_fwd, ref_fb = time_case(case, "xla", iters)
  rows.append(dict(op=case["op"], shape=case["shape"], impl="xla", block=None, fwd_ms=ref_fwd * 1e3,
                   fwd_bwd_ms=ref_fb * 1e3))
  if timed_kernel:
    for blocks in sweep:
      label = f"rows={blocks.rows} cols={blocks.cols} warps={blocks.num_warps}"
      try:
        out, t_fwd, t_fb = time_case(case, "pallas", iters, blocks)
        rows.append(dict(op=case["op"], shape=case["shape"], impl="pallas", block=label,
                         fwd_ms=t_fwd * 1e3, fwd_bwd_ms=t_fb * 1e3,
                         rel_err_vs_xla=relative_error(out, ref_out)))
      except Exception as e:  # one failing configuration must not lose the others' numbers
        rows.append(dict(op=case["op"], shape=case["shape"], impl="pallas", block=label,
                         error=f"{type(e).__name__}: {str(e)[:300]}"))
  else:
    rows.append(dict(op=case["op"], shape=case["shape"], impl="pallas", block=None,
                     note="interpret mode: not timed"))
  for r in rows:
    for part, nbytes in (("fwd", case["bytes_fwd"]), ("fwd_bwd", case["bytes_fwd_bwd"])):
      if f"{part}_ms" in r:
        seconds = r[f"{part}_ms"] / 1e3
        r[f"{part}_GBps"] = nbytes / seconds / 1e9
        r[f"{part}_pct_copy_bw"] = 100 * nbytes / seconds / bandwidth
        r[f"{part}_speedup"] = (ref_fwd if part == "fwd" else ref_fb) / seconds
    if case["flops_fwd"] and "fwd_ms" in r:
      r["fwd_TFLOPs"] = case["flops_fwd"] / (r["fwd_ms"] / 1e3) / 1e12
  return rows


def interpret_check(key) -> dict:
  """On a CPU: the interpret-mode kernels against the references, forward and gradients."""
  errors = {}
  small = dict(attention=dict(B=2, H=2, D=32, N=(200,)), gate=dict(B=2, N=100, D=32, G=(32, 1)))
  for case in list(attention_cases(small, key)) + list(gate_cases(small, key)):
    outs = {impl: forward_and_grads(case["fn"](impl))(*case["args"], case["ct"])
            for impl in ("pallas", "xla")}
    flat = [jax.tree.leaves(outs[impl]) for impl in ("pallas", "xla")]
    errors[case["op"]] = max(relative_error(a, b) for a, b in zip(*flat))
  return errors


def format_table(rows) -> str:
  cols = [("op", "op", "{}"), ("shape", "shape", "{}"), ("impl", "impl", "{}"), ("block", "block", "{}"),
          ("fwd_ms", "fwd ms", "{:.3f}"), ("fwd_GBps", "GB/s", "{:.3g}"),
          ("fwd_pct_copy_bw", "% copy", "{:.1f}"), ("fwd_speedup", "x ref", "{:.2f}"),
          ("fwd_TFLOPs", "TFLOP/s", "{:.3g}"), ("fwd_bwd_ms", "fwd+bwd ms", "{:.3f}"),
          ("fwd_bwd_pct_copy_bw", "% copy", "{:.1f}"), ("fwd_bwd_speedup", "x ref", "{:.2f}"),
          ("rel_err_vs_xla", "rel err", "{:.1e}")]
  lines = ["| " + " | ".join(c[1] for c in cols) + " | note |",
           "|" + "---|" * (len(cols) + 1)]
  for r in rows:
    cells = [fmt.format(r[k]) if r.get(k) is not None else "" for k, _, fmt in cols]
    lines.append("| " + " | ".join(cells) + f" | {r.get('note', r.get('error', ''))} |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=None, help="JSON file (default results/kernels_bench_<device>.json)")
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--sizes", choices=("paper", "small"), default=None,
                      help="paper = the issue's shapes (default on a GPU); small (default on a CPU)")
  parser.add_argument("--no-sweep", action="store_true", help="time only the default settings")
  args = parser.parse_args(argv)
  gpu = common.on_gpu()
  sizes = PAPER_SIZES if (args.sizes or ("paper" if gpu else "small")) == "paper" else SMALL_SIZES
  key = jax.random.key(0)
  device = jax.devices()[0]
  bandwidth = copy_bandwidth(args.iters)
  print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
        f"copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
  report = dict(device=device.device_kind, backend=jax.default_backend(), jax=jax.__version__,
                date=time.strftime("%Y-%m-%d"), copy_GBps=bandwidth / 1e9, rows=[])
  if not gpu:
    report["interpret_max_rel_err"] = interpret_check(key)
    print("interpret-mode kernels vs reference (max relative error, forward and gradients):",
          {k: f"{v:.1e}" for k, v in report["interpret_max_rel_err"].items()}, flush=True)
  for cases, sweep in ((attention_cases(sizes, key), SWEEPS["attention"]),
                       (gate_cases(sizes, key), SWEEPS["gate"])):
    if args.no_sweep:
      sweep = sweep[:1]
    for case in cases:
      rows = bench_case(case, sweep, bandwidth, args.iters, timed_kernel=gpu)
      table = format_table(rows)
      print(table if not report["rows"] else table.split("\n", 2)[-1], flush=True)
      report["rows"] += rows
  out = args.out or os.path.join("results", f"kernels_bench_{device.device_kind.replace(' ', '_')}.json")
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w") as f:
    json.dump(report, f, indent=1)
  print(f"wrote {out}")
  return report


if __name__ == "__main__":
  main()
