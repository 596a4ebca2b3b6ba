"""PiD (arXiv 2605.23902): the pixel diffusion decoder against AE decode + bicubic and the cascade.

  python -m experiments.tables.pid --preset cpu [--runs runs/tables] [--out results]

Trains or reuses (experiments.training.train_timed) the runs under RUNS: the autoencoder
pid_autoencoder_PRESET, the pretrained backbone pid_backbone_PRESET, the teachers pid_x4 / pid_x8 (and,
where they fine-tune the backbone, the paper's adapter-only recipe pid_adapter_x4), the cascades
pid_cascade_x4 / _x8, the DMD2 students pid_dmd (GAN term) and pid_dmd_no_gan, the teacher on another
latent space pid_f16c16_x4 (its autoencoder pid_autoencoder_f16c16) and the latent generator
pid_latent (all _PRESET). On the eval photos' HR crops (their antialiased bicubic downsampling is the
LR input, encoded by the autoencoder): PSNR / SSIM against the HR crop, colour error (CIEDE2000 of the
output brought back to the LR size, against the LR input), NIQE, the decoder's NFE and its latency per
image on this machine. Then the early-exit sweep: latents sampled by pid_latent stopped at sigma_exit
and decoded with sigma_lat = sigma_exit (and, to isolate the adapter's role, with sigma_lat = 0),
against the decode of the finished latent. Writes pid.md, pid.json and pid_crops.png into --out.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import experiments.tasks  # noqa: F401  (registers the tasks)
from core import data, flow, flow_task, metrics, train, writers
from decoders import distill, latent_flow, task as pid_task
from experiments import plots
from experiments.configs import pid as pid_config, pid_autoencoder, pid_distill, pid_latent
from experiments.training import table_parser, train_timed, training_section, write_report

# Per preset: scales, eval crops, the teacher's and the cascade's Euler steps, the latent sampler's
# steps, the early-exit sigmas and samples, timed repeats, the DMD2 variants, the second latent, and
# the teacher's sigma_lat 0.2 and 4-step rows (left out at smoke, whose test only needs each kind).
SETTINGS = {
    "smoke": {"scales": (4,), "eval": 2, "steps": 2, "latent_steps": 4, "exits": (0.0, 0.4),
              "exit_samples": 2, "repeats": 1, "dmd": ("gan",), "f16c16": False, "extra_rows": False},
    "cpu": {"scales": (4, 8), "eval": 28, "steps": 16, "latent_steps": 20,
            "exits": (0.0, 0.2, 0.4, 0.6), "exit_samples": 16, "repeats": 5,
            "dmd": ("gan", "no_gan"), "f16c16": True, "extra_rows": True},
    "paper": {"scales": (4, 8), "eval": 64, "steps": 16, "latent_steps": 28,
              "exits": (0.0, 0.2, 0.4, 0.6), "exit_samples": 64, "repeats": 10,
              "dmd": ("gan", "no_gan"), "f16c16": True, "extra_rows": True},
}
PAPER = [
    "PiD is ~6x faster than cascaded diffusion SR at comparable quality; DMD2 to 4 steps; 512 px latent "
    "to 2048x2048 in < 1 s on an RTX 5090 (13 GB peak) and 210 ms on a GB200 (the paper).",
    "A third-party comparison (compiled): PiD NIQE 3.50 at 211 ms; VAE + Real-ESRGAN 4.93 at 62 ms; "
    "VAE + SeedVR2-3B 4.05 at 1237 ms (design doc pid.md).",
]


MODES = {"adapter": "the adapter alone on the frozen pretrained backbone, the paper's recipe",
         "full": "the adapter and the pretrained backbone fine-tuned together: at this preset the "
                 "adapter alone steers the small backbone less, see the adapter-only row and "
                 "experiments/configs/pid.py"}


def run_name(variant: str, preset: str) -> str:
  return f"pid_{variant}_{preset}"


def _latency_ms(fn, *args, repeats: int) -> float:
  """Minimum wall-clock of fn(*args) in ms over `repeats` calls after a compiling one."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return 1000 * best


def _to01(x):
  return np.clip((np.asarray(x, np.float64) + 1) / 2, 0, 1)


def niqe_mean(images) -> float | None:
  """Mean NIQE over images in [-1, 1]; None when they are smaller than NIQE's 96 px blocks."""
  x = _to01(images)
  if min(x.shape[1:3]) < metrics.NIQE_BLOCK:
    return None
  return float(np.mean([metrics.niqe(img, data_range=1.0) for img in x]))


def quality(out, hr, lr) -> dict:
  """PSNR / SSIM against the HR crops, colour error against the LR input, NIQE."""
  q = metrics.image_quality(jnp.asarray(out), jnp.asarray(hr))
  return {**q, "colour": float(metrics.colour_error(_to01(out), _to01(lr)).mean()),
          "niqe": niqe_mean(out)}


class Decoders:
  """The trained decoders of one scale, each a jitted (latent, noise) -> image of the eval batch."""

  def __init__(self, preset: str, runs: str, scale: int, trained: dict):
    s = SETTINGS[preset]
    suffix = f"x{scale}"
    teacher_dir = os.path.join(runs, run_name(suffix, preset))
    trained[suffix] = train_timed(pid_config.get_config(f"{preset},{suffix}"), teacher_dir)
    cascade_dir = os.path.join(runs, run_name(f"cascade_{suffix}", preset))
    trained[f"cascade_{suffix}"] = train_timed(pid_config.get_config(f"{preset},cascade_{suffix}"),
                                               cascade_dir)
    self.teacher, config = train.restore_params(teacher_dir)
    self.cascade, _ = train.restore_params(cascade_dir)
    self.model = pid_task.build_model(config)
    self.cascade_model = pid_task.build_model(train.load_config(cascade_dir))
    self.encoder = pid_task.load_encoder(config, teacher_dir)
    self.config, self.scale = config, scale
    self.shift = pid_task.pixel_shift(config, pid_task.hr_size(config))
    self.grid = flow.time_grid(s["steps"], shift=self.shift)
    self.adapter_only = None         # the paper's recipe, where the teachers fine-tune the backbone
    if scale == 4 and s["extra_rows"] and config.pid.mode != "adapter":
      path = os.path.join(runs, run_name("adapter_x4", preset))
      trained["adapter_x4"] = train_timed(pid_config.get_config(f"{preset},adapter_x4"), path)
      self.adapter_only = train.restore_params(path)[0]
    self.students = {}
    self.student_cfg = float(pid_distill.get_config(preset).distill.teacher_cfg)
    if scale == 4:
      for variant in s["dmd"]:
        name = "dmd" if variant == "gan" else "dmd_no_gan"
        path = os.path.join(runs, run_name(name, preset))
        trained[name] = train_timed(pid_distill.get_config(f"{preset},{variant}"), path)
        self.students[variant] = train.restore_params(path)[0]["student"]

  def ae_bicubic(self, z, noise):
    return pid_task.decode_and_upsample(self.encoder, z, noise.shape[1:3])

  def pid(self, params, z, noise, sigma=0.0, steps_grid=None, cfg=1.0):
    grid = self.grid if steps_grid is None else steps_grid
    return pid_task.decode(self.model, params, z, sigma, noise, grid, cfg)

  def cascade_sr(self, z, noise):
    return pid_task.decode(self.cascade_model, self.cascade, None, 0.0, noise, self.grid,
                           image_cond=self.ae_bicubic(z, noise))

  def student(self, params, z, noise, sigma=0.0):
    b = z.shape[0]
    x0_fn = lambda x, t: x - flow.time_like(t, x) * self.model.apply(
        {"params": params}, x, t, z, jnp.full((b,), sigma))
    return distill.student_sample(x0_fn, noise, jax.random.PRNGKey(7))


def eval_crops(config, n: int) -> np.ndarray:
  dc = config.data
  return data.to_float({"image": data.load_in_memory(dc.name, dc.eval_split, config=dc.config)
                        .arrays["image"][:n]}, None)["image"]


def scale_rows(dec: Decoders, preset: str) -> tuple[list[dict], dict]:
  """The main table's rows at one scale, and the crops for the figure."""
  s = SETTINGS[preset]
  hr = eval_crops(dec.config, s["eval"])
  lr = np.asarray(pid_task.downsample(jnp.asarray(hr), dec.scale))
  z = jax.jit(dec.encoder.encode)(jnp.asarray(lr))
  noise = jax.random.normal(jax.random.PRNGKey(0), hr.shape)
  steps = s["steps"]
  four = flow.time_grid(4, shift=dec.shift)
  methods = {
      "AE decode + bicubic": (jax.jit(dec.ae_bicubic), 0),
      f"cascade: AE decode + pixel diffusion SR ({steps} steps)": (jax.jit(dec.cascade_sr), steps),
      f"PiD teacher ({steps} steps, sigma_lat 0)": (jax.jit(lambda z, n: dec.pid(dec.teacher, z, n)), steps),
  }
  if s["extra_rows"]:
    methods[f"PiD teacher ({steps} steps, sigma_lat 0.2)"] = (
        jax.jit(lambda z, n: dec.pid(dec.teacher, z, n, 0.2)), steps)
    methods["PiD teacher (4 Euler steps)"] = (
        jax.jit(lambda z, n: dec.pid(dec.teacher, z, n, 0.0, four)), 4)
  if dec.adapter_only is not None:
    methods[f"PiD, adapter only on the frozen backbone ({steps} steps, sigma_lat 0)"] = (
        jax.jit(lambda z, n: dec.pid(dec.adapter_only, z, n)), steps)
  if s["extra_rows"] and dec.students and dec.student_cfg != 1.0:
    # What the students distil: the teacher under the released recipe's CFG.
    methods[f"PiD teacher ({steps} steps, CFG {dec.student_cfg:g}: the students' target)"] = (
        jax.jit(lambda z, n: dec.pid(dec.teacher, z, n, cfg=dec.student_cfg)), steps)
  for variant, params in dec.students.items():
    label = "with GAN term" if variant == "gan" else "without GAN term"
    methods[f"PiD student, DMD2 4 steps, {label}"] = (
        jax.jit(lambda z, n, p=params: dec.student(p, z, n)), 4)
  rows, outputs = [], {}
  for method, (fn, nfe) in methods.items():
    # One image per call, as the latency is measured: one compile per method.
    out = np.concatenate([np.asarray(fn(z[i:i + 1], noise[i:i + 1])) for i in range(len(hr))])
    ms = _latency_ms(fn, z[:1], noise[:1], repeats=s["repeats"])
    rows.append({"method": method, "scale": dec.scale, "nfe": nfe, "ms": ms, **quality(out, hr, lr)})
    outputs[method] = out
    writers.log(f"{dec.scale}x {method}: PSNR {rows[-1]['psnr']:.2f}, {ms:.0f} ms")
  return rows, {"hr": hr, "lr": lr, "outputs": outputs}


def early_exit_rows(dec: Decoders, preset: str, runs: str, trained: dict) -> list[dict]:
  """Latents from pid_latent stopped at each sigma_exit, decoded by the 4x teacher."""
  s = SETTINGS[preset]
  path = os.path.join(runs, run_name("latent", preset))
  trained["latent"] = train_timed(pid_latent.get_config(preset), path)
  params, lconfig = train.restore_params(path)
  lmodel = flow_task.build_model(lconfig)
  h = pid_task.hr_size(dec.config) // dec.scale // dec.encoder.factor
  shape = (s["exit_samples"], h, h, int(dec.encoder.config.model.z_channels))
  x_T = jax.random.normal(jax.random.PRNGKey(11), shape)
  size = pid_task.hr_size(dec.config)
  noise = jax.random.normal(jax.random.PRNGKey(12), (s["exit_samples"], size, size, 3))
  velocity = lambda x, t: lmodel.apply({"params": params}, x, t)
  shift = float(lconfig.flow.sample_shift)
  decode = jax.jit(lambda z, sig: dec.pid(dec.teacher, z, noise, sig))
  ae = jax.jit(lambda z: dec.ae_bicubic(z, noise))
  rows, reference = [], None
  for sigma_exit in s["exits"]:
    z, _, nfe = latent_flow.early_exit(velocity, x_T, s["latent_steps"], shift, sigma_exit)
    aware = np.asarray(decode(z, sigma_exit))
    if reference is None:                        # sigma_exit = 0 comes first: the finished latent
      reference = aware
    ref = jnp.asarray(reference)
    for label, out in (("PiD, sigma_lat = sigma_exit", aware),
                       ("PiD, sigma_lat = 0", np.asarray(decode(z, 0.0))),
                       ("AE decode + bicubic", np.asarray(ae(z)))):
      if sigma_exit == 0 and label == "PiD, sigma_lat = 0":
        continue
      q = metrics.image_quality(jnp.asarray(out), ref)
      rows.append({"sigma_exit": sigma_exit, "decoder": label, "latent_nfe": nfe,
                   "latent_nfe_saved": s["latent_steps"] - nfe, "psnr_vs_full": q["psnr"],
                   "ssim_vs_full": q["ssim"], "niqe": niqe_mean(out)})
  return rows


def _fmt(v, spec=".2f"):
  return "—" if v is None else format(v, spec)


def targets(result: dict) -> list[str]:
  """The issue's cpu-preset targets, each measured from the rows (met / NOT met where it has a bar)."""
  steps, out = result["settings"]["steps"], []
  verdict = lambda ok: "met" if ok else "NOT met"
  row = lambda scale, method: next((r for r in result["rows"]
                                    if r["scale"] == scale and r["method"] == method), None)
  teacher_name = f"PiD teacher ({steps} steps, sigma_lat 0)"
  for scale in result["settings"]["scales"]:
    t = row(scale, teacher_name)
    c = row(scale, f"cascade: AE decode + pixel diffusion SR ({steps} steps)")
    if t and c:
      ok = t["psnr"] >= c["psnr"] and t["ssim"] >= c["ssim"] and t["ms"] < c["ms"]
      out.append(f"{scale}x: PiD matches or beats the cascade's PSNR / SSIM at lower latency: "
                 f"{t['psnr'] - c['psnr']:+.2f} dB, SSIM {t['ssim'] - c['ssim']:+.3f}, at "
                 f"{t['ms'] / c['ms']:.2f}x its latency: {verdict(ok)} (the paper: ~6x faster).")
    z = row(scale, f"PiD teacher ({steps} steps, sigma_lat 0.2)")
    if t and z and t["niqe"] is not None and z["niqe"] is not None:
      out.append(f"{scale}x: sigma_lat 0.2 at decode against 0: NIQE {t['niqe']:.2f} -> {z['niqe']:.2f} "
                 f"({z['niqe'] - t['niqe']:+.2f}; lower is more natural), PSNR "
                 f"{z['psnr'] - t['psnr']:+.2f} dB.")
  t = row(4, teacher_name)
  cfg = next((r for r in result["rows"] if r["scale"] == 4 and "the students' target" in r["method"]), None)
  for r in result["rows"]:
    if r["scale"] == 4 and r["method"].startswith("PiD student") and t:
      against_cfg = f" (against the teacher at its CFG: {r['psnr'] - cfg['psnr']:+.2f} dB)" if cfg else ""
      out.append(f"{r['method']} within 1 dB PSNR of the teacher: {r['psnr'] - t['psnr']:+.2f} dB: "
                 f"{verdict(r['psnr'] >= t['psnr'] - 1.0)}{against_cfg}.")
  for e in result["early_exit"]:
    if e["decoder"] == "PiD, sigma_lat = sigma_exit" and 0.2 <= e["sigma_exit"] <= 0.4:
      out.append(f"Early exit at sigma {e['sigma_exit']:.1f} saves {e['latent_nfe_saved']} latent steps; "
                 f"its decode is {e['psnr_vs_full']:.2f} dB from the finished latent's.")
  return out


def markdown(result: dict) -> str:
  s, preset = result["settings"], result["preset"]
  lines = [
      "# PiD: pixel diffusion decoder with a sigma-aware adapter", "",
      f"Written by `python -m experiments.tables.pid --preset {preset}` ({result['seconds']:.0f} s on "
      f"{result['device']}; training included only for runs not yet trained). "
      "arXiv 2605.23902; the method lives in `decoders/`. "
      f"{s['eval']} eval HR crops ({result['hr_size']} px) of the held-out photos; the LR input is their "
      "antialiased bicubic downsampling, encoded by the autoencoder; every method decodes that latent. "
      "PSNR / SSIM against the HR crop (mean ± std over crops), colour error = CIEDE2000 of the output "
      "brought down to the LR size against the LR input, NIQE (BasicSR's, lower = more natural; '—' "
      "below 96 px), NFE of the decoder (the autoencoder decode not counted), latency per image "
      f"(batch 1, minimum of {s['repeats']} runs after compiling, the latent given). The teachers "
      f"were trained in `{result['teacher_mode']}` mode ({MODES[result['teacher_mode']]}).", "",
      "| scale | method | NFE | latency (ms) | PSNR (dB) | SSIM | colour error | NIQE |",
      "|---|---|---:|---:|---:|---:|---:|---:|"]
  for r in result["rows"]:
    lines.append(f"| {r['scale']}x | {r['method']} | {r['nfe']} | {r['ms']:.0f} | {r['psnr']:.2f} ± "
                 f"{r['psnr_std']:.2f} | {r['ssim']:.3f} | {r['colour']:.2f} | {_fmt(r['niqe'])} |")
  if result.get("other_latent"):
    lines += ["", "Another latent space (a deeper f16 autoencoder with 16 channels, the same "
              "compression; the paper shows SigLIP / DINOv2 latents):", "",
              "| method | PSNR (dB) | SSIM | colour error | NIQE |", "|---|---:|---:|---:|---:|"]
    for r in result["other_latent"]:
      lines.append(f"| {r['method']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['colour']:.2f} | "
                   f"{_fmt(r['niqe'])} |")
  lines += ["", f"## Early exit ({s['exit_samples']} latents of pid_latent, {s['latent_steps']} Euler "
            "steps when finished, decoded by the 4x teacher; quality against the decode of the "
            "finished latent from the same noise)", "",
            "| sigma_exit | decoder | latent NFE | saved | PSNR vs full (dB) | SSIM vs full | NIQE |",
            "|---:|---|---:|---:|---:|---:|---:|"]
  for r in result["early_exit"]:
    lines.append(f"| {r['sigma_exit']:.1f} | {r['decoder']} | {r['latent_nfe']} | {r['latent_nfe_saved']} "
                 f"| {r['psnr_vs_full']:.2f} | {r['ssim_vs_full']:.3f} | {_fmt(r['niqe'])} |")
  lines += ["", "## The issue's targets at this preset", ""] + [f"- {t}" for t in targets(result)]
  lines += ["", "![crops](pid_crops.png)", ""] + training_section(result["trained"], " (EMA params)")
  lines += ["", "## The paper's figures", ""] + [f"- {p}" for p in PAPER] + [""]
  return "\n".join(lines)


def figure(crops: dict, path: str, n: int = 4) -> None:
  """Rows: input (LR, nearest-upsampled), AE + bicubic, cascade, teacher, student, HR."""
  hr, lr, outs = crops["hr"][:n], crops["lr"][:n], crops["outputs"]
  k = hr.shape[1] // lr.shape[1]
  pick = lambda prefix: next(v for m, v in outs.items() if m.startswith(prefix))[:n]
  rows = [("input", np.repeat(np.repeat(lr, k, 1), k, 2)), ("AE + bicubic", pick("AE")),
          ("cascade", pick("cascade")), ("PiD teacher", pick("PiD teacher"))]
  if any(m.startswith("PiD student") for m in outs):
    rows.append(("PiD student", pick("PiD student")))
  rows.append(("HR", hr))
  plots.sample_grid(np.concatenate([np.clip(r, -1, 1) for _, r in rows]), path, ncol=n,
                    row_labels=[name for name, _ in rows], title=f"PiD {k}x on held-out crops",
                    ylabel="")


def main(argv: list[str] | None = None) -> None:
  args = table_parser(__doc__, "pid.md, pid.json and pid_crops.png").parse_args(argv)
  s = SETTINGS[args.preset]
  os.makedirs(args.out, exist_ok=True)
  t0 = time.perf_counter()
  trained, rows, crops, exits, other = {}, [], None, [], []
  for scale in s["scales"]:
    dec = Decoders(args.preset, args.runs, scale, trained)
    scale_result, scale_crops = scale_rows(dec, args.preset)
    rows += scale_result
    if scale == 4:
      crops = scale_crops
      exits = early_exit_rows(dec, args.preset, args.runs, trained)
  if s["f16c16"]:
    path = os.path.join(args.runs, run_name("f16c16_x4", args.preset))
    trained["f16c16_x4"] = train_timed(pid_config.get_config(f"{args.preset},f16c16_x4"), path)
    params, config = train.restore_params(path)
    model, encoder = pid_task.build_model(config), pid_task.load_encoder(config, path)
    hr = eval_crops(config, s["eval"])
    lr = np.asarray(pid_task.downsample(jnp.asarray(hr), 4))
    z = encoder.encode(jnp.asarray(lr))
    grid = flow.time_grid(s["steps"], shift=pid_task.pixel_shift(config, pid_task.hr_size(config)))
    noise = jax.random.normal(jax.random.PRNGKey(0), hr.shape)
    out = np.asarray(jax.jit(lambda z: pid_task.decode(model, params, z, 0.0, noise, grid))(z))
    other = [{"method": "AE (f16c16) decode + bicubic",
              **quality(np.asarray(pid_task.decode_and_upsample(encoder, z, hr.shape[1:3])), hr, lr)},
             {"method": f"PiD teacher on f16c16 latents ({s['steps']} steps)", **quality(out, hr, lr)}]
  # The runs the others were built on (trained by registry.prepare; reused here, only read).
  built_on = {"autoencoder": pid_autoencoder.get_config(args.preset),
              "backbone": pid_config.get_config(f"{args.preset},backbone")}
  if s["f16c16"]:
    built_on["autoencoder_f16c16"] = pid_autoencoder.get_config(f"{args.preset},f16c16")
  for name, config in built_on.items():
    trained[name] = train_timed(config, os.path.join(args.runs, run_name(name, args.preset)))
  seconds = time.perf_counter() - t0
  result = {"preset": args.preset, "settings": s, "seconds": seconds,
            "device": jax.devices()[0].device_kind, "hr_size": int(crops["hr"].shape[1]),
            "teacher_mode": str(pid_config.get_config(args.preset).pid.mode),
            "rows": rows, "early_exit": exits, "other_latent": other, "trained": trained}
  figure(crops, os.path.join(args.out, "pid_crops.png"))
  write_report(args.out, "pid", result, markdown(result))
  writers.log(f"wrote {args.out}/pid.md, pid.json, pid_crops.png in {seconds:.0f} s")


if __name__ == "__main__":
  main()
