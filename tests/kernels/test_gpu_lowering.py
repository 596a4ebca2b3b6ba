"""The kernels lower to Triton for CUDA, forward and backward, at the benchmark's tile shapes.

Lowering needs no GPU: `lower(lowering_platforms=("cuda",))` runs Pallas's Triton lowering on this
machine, which rejects what Triton cannot compile (tiles that are not powers of two, unsupported ops,
mixed-dtype dots) before a GPU ever sees the kernel. PTX compilation itself still needs a GPU.
"""
import jax
import jax.numpy as jnp
import pytest

from kernels import bench
from kernels import linear_attention as la
from kernels import sigma_gate as sg


def triton_calls(fn, *args) -> int:
  """How many Triton kernels fn becomes when lowered for CUDA."""
  shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
  text = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
  return text.count("__gpu$xla.gpu.triton")


def forward_and_grads(f):
  def run(*args):
    *inputs, ct = args
    out, vjp = jax.vjp(f, *inputs)
    return out, vjp(ct)
  return run


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("d", [32, 64])
def test_linear_attention_lowers_to_triton(dtype, d):
  q = jnp.zeros((2, 1024, 3, d), dtype)
  rows, warps = la.DEFAULT_BLOCKS.rows, la.DEFAULT_BLOCKS.num_warps
  f = lambda q, k, v: la._linear_attention(q, k, v, 1e-6, False, rows, rows, warps)
  assert triton_calls(f, q, q, q) == 2                          # key sums, output
  assert triton_calls(forward_and_grads(f), q, q, q, q) == 4    # + query grads, key grads


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("gate_width", ["D", 1])
def test_sigma_gate_lowers_to_triton(dtype, gate_width):
  d = 1536    # PiD's width: not a power of two, so the kernels tile it by 128
  g = d if gate_width == "D" else 1
  x = jnp.zeros((1, 256, d), dtype)
  w = jnp.zeros((d, g), dtype)
  c = jnp.zeros((1, 1, g), jnp.float32)
  f = lambda x, lq, w_x, w_lq, c: sg._sigma_gate(x, lq, w_x, w_lq, c, False, sg.DEFAULT_BLOCKS)
  assert triton_calls(f, x, x, w, w, c) == 1
  # Per channel: recompute + da, then dx and dlq; per token: one fused pass.
  assert triton_calls(forward_and_grads(f), x, x, w, w, c, x) == (3 if g == d else 2)


def test_gpu_kernels_refuse_shapes_triton_cannot_tile(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  q = jnp.zeros((1, 8, 2, 24))
  with pytest.raises(ValueError, match="powers of two"):
    la.linear_attention(q, q, q, impl="pallas", interpret=False)
  x = jnp.zeros((1, 8, 24))
  with pytest.raises(ValueError, match="multiple of 16"):
    sg.sigma_gate(x, x, jnp.zeros(1), jnp.zeros((48, 24)), jnp.zeros(24), jnp.float32(0),
                  impl="pallas", interpret=False)


def test_bench_runs_on_cpu(tmp_path, capsys, monkeypatch):
  """On a CPU the benchmark times the references, checks the interpret-mode kernels and writes JSON."""
  monkeypatch.setattr(bench, "SMALL_SIZES", dict(attention=dict(B=1, H=2, D=32, N=(256,)),
                                                 gate=dict(B=1, N=64, D=64, G=(64, 1))))
  report = bench.main(["--iters", "1", "--out", str(tmp_path / "bench.json")])
  assert (tmp_path / "bench.json").exists()
  assert {r["impl"] for r in report["rows"]} == {"xla", "pallas"}
  assert all(r["note"] == "interpret mode: not timed" for r in report["rows"] if r["impl"] == "pallas")
  assert all(err < 2e-2 for err in report["interpret_max_rel_err"].values())
  assert "copy bandwidth" in capsys.readouterr().out
