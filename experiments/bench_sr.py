"""Paper-scale SANA-SR: parameters and MACs of one-step 4x SR at 512 x 512 output, and GPU latency.

  python -m experiments.bench_sr [--sizes 512,1024,2048] [--repeats 50] [--dtype bfloat16]
      [--macs_only] [--out results/bench_sr_<device>.json]

The `paper` preset of experiments/configs/sana_sr.py with random weights, batch 1, LR -> SR end to end:
  dcae          bicubic x4 -> DC-AE f32c32 encoder (dc-ae-f32c32-sana-1.0) -> the 19-block, width-1152
                LinearDiT (one evaluation) -> the DC-AE decoder
  encoder_free  pixel_unshuffle(8) + Linear in place of the encoder -> the same DiT -> the DC-AE decoder
                at 0.5625 of its widths (design doc sana_sr.md, "the MAC figure")
  *_softmax     the same with the DiT's linear attention replaced by softmax attention (the twin)
MACs come from the lowered HLO's cost analysis (`core.metrics.flops`: the compiled GPU analysis leaves
out cuDNN convolutions), counted on any backend without materialising the weights; the paper quotes
407.95 G MACs, 344 M parameters and 0.019 s. Latency (GPU only, unless --force): compiled, bf16
weights and activations, warm-up then --repeats timed runs ended by block_until_ready; min and median.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

REFERENCE = {"paper_macs_g": 407.95, "paper_params_m": 344.0, "paper_latency_ms": 19.0,
             "target_latency_ms_h100": 10.0, "anchor_lineardit_0.65b_512px_ms_h200": 4.0,
             "design_encoder_free_macs_g": 407.0, "design_dcae_encoder_macs_g": 647.0,
             "design_dcae_decoder_macs_g": 1046.0}


def paper_models(attention: str = "linear", dtype=jnp.float32, preset: str = "paper"):
  """{variant: (SR model, abstract mode params, abstract DC-AE params, abstract prior params)} at the
  preset's sizes (jax.ShapeDtypeStruct trees: nothing is allocated)."""
  from core import flow_task
  from experiments.configs import sana_sr
  from sr import autoencoding, dcae, onestep
  config = sana_sr.get_config(preset)
  config.prior.model.attention = attention
  config.prior.train.compute_dtype = config.dcae.train.compute_dtype = "float32"
  ae_model = dcae.DCAE(autoencoding.spec(config.dcae.model), dtype=dtype)
  dit = flow_task.build_model(config.prior).clone(dtype=dtype)
  sc = config.sr
  shape = lambda f, *a: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype),
                                     jax.eval_shape(f, *a))
  key = jax.random.PRNGKey(0)
  ae_params = shape(lambda: ae_model.init(key, jnp.zeros((1, 64, 64, 3)))["params"])
  lat = int(config.dcae.model.latent_channels)
  dit_params = shape(lambda: dit.init(key, jnp.zeros((1, 2, 2, lat)), jnp.zeros((1,)))["params"])
  ae = autoencoding.untrained(ae_model)
  lora_scale = float(sc.lora_alpha) / int(sc.lora_rank)
  # The one-step model as deployed: LoRA merged into the DiT ("pruned" mode holds a plain DiT).
  models = {"dcae": (onestep.SR("pruned", ae, dit, None, float(sc.t_star), int(sc.scale), lora_scale),
                     {"dit": dit_params}, ae_params, None)}
  narrow = dcae.Decoder(dataclasses.replace(ae_model.spec, widths=onestep.narrow_widths(config)),
                        dtype=dtype)
  pf = ae_model.spec.factor // int(sc.scale)
  free = onestep.SR("encoder_free", ae, dit, None, float(sc.t_star), int(sc.scale), lora_scale,
                    decoder=narrow)
  free_params = {"proj": {"kernel": jax.ShapeDtypeStruct((3 * pf * pf, lat), dtype),
                          "bias": jax.ShapeDtypeStruct((lat,), dtype)},
                 "dit": dit_params,
                 "decoder": shape(lambda: narrow.init(key, jnp.zeros((1, 2, 2, lat)))["params"])}
  models["encoder_free"] = (free, free_params, ae_params, None)
  return models


def count(models: dict, size: int) -> dict:
  """{variant: {"params", "macs"}} at size x size output."""
  from sr import onestep
  out = {}
  for name, (model, params, ae_params, base) in models.items():
    lr = (1, size // model.scale, size // model.scale, 3)
    out[name] = onestep.costs(model, params, lr, ae_params, base)
  return out


def _materialise(tree, seed: int = 0):
  """Random N(0, 0.02^2) arrays of the abstract tree's shapes (numpy draws: one jax.random call per
  leaf would compile a program per shape)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda l: jnp.asarray((0.02 * rng.standard_normal(l.shape, np.float32)), l.dtype),
                      tree)


def latency(model, params, ae_params, base, size: int, repeats: int) -> dict:
  """Compiled end-to-end ms (min, median) of one LR -> SR at size x size output, random weights."""
  key = jax.random.PRNGKey(0)
  params = _materialise({"mode": params, "ae": ae_params, "base": base if base is not None else {}})
  lr = jax.random.uniform(key, (1, size // model.scale, size // model.scale, 3), minval=-1, maxval=1)
  fn = jax.jit(lambda p, x: model.with_frozen(p["ae"], p["base"] or None)(p["mode"], x))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(params, lr))
  compile_s = time.perf_counter() - t0
  for _ in range(5):
    jax.block_until_ready(fn(params, lr))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(params, lr))
    times.append(1e3 * (time.perf_counter() - t0))
  return {"ms_min": min(times), "ms_median": statistics.median(times), "compile_s": compile_s}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="paper", choices=("smoke", "cpu", "paper"),
                      help="the sizes of experiments/configs/sana_sr.py to build (smoke: a quick check)")
  parser.add_argument("--sizes", default="512,1024,2048", help="output sizes for the latency")
  parser.add_argument("--repeats", type=int, default=50)
  parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  parser.add_argument("--macs_only", action="store_true", help="only parameters and MACs")
  parser.add_argument("--force", action="store_true", help="time paper-size models on a CPU too")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  device = jax.devices()[0].device_kind
  result = {"device": device, "preset": args.preset, "reference": REFERENCE, "costs_512": {},
            "latency": []}
  for attention in ("linear", "xla"):
    tag = "" if attention == "linear" else "_softmax"
    for name, c in count(paper_models(attention, preset=args.preset), 512).items():
      result["costs_512"][name + tag] = c
      print(f"{name + tag:22s} {c['params'] / 1e6:8.1f} M params {c['macs'] / 1e9:9.1f} G MACs at 512 px")
  on_gpu = jax.default_backend() == "gpu"
  if not args.macs_only and (on_gpu or args.force):
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    for attention in ("linear", "xla"):
      for name, (model, params, ae_params, base) in paper_models(attention, dtype, args.preset).items():
        for size in (int(s) for s in args.sizes.split(",")):
          row = {"variant": name + ("" if attention == "linear" else "_softmax"), "size": size,
                 **latency(model, params, ae_params, base, size, args.repeats)}
          result["latency"].append(row)
          print(f"{row['variant']:22s} {size:5d} px  min {row['ms_min']:8.2f} ms  median "
                f"{row['ms_median']:8.2f} ms  (compile {row['compile_s']:.0f} s)", flush=True)
  elif not args.macs_only:
    print(f"latency: skipped on {jax.default_backend()} (--force to time the models here)")
  out = args.out or os.path.join("results", f"bench_sr_{device.replace(' ', '_').lower()}.json")
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
