"""DMD2 distillation of the PiD 4x teacher (pid.py) to 4 steps, as released (design doc pid.md).

Argument `preset[,variant]`; variants: `gan` (default: the released recipe, GAN term on) and `no_gan`.
The teacher run ../pid_x4_<preset> (and what it needs) is trained first when missing:
  python -m experiments.main --config experiments/configs/pid_distill.py:cpu --workdir runs/pid_dmd_cpu
"""
from experiments.configs import _base, pid

VARIANTS = ("gan", "no_gan")


def get_config(arg: str = "cpu"):
  preset, variant = _base.parse_arg(arg, VARIANTS)
  c = pid.get_config(preset)       # the teacher's data, model and PiD fields
  c.task = "pid_distill"
  c.teacher = pid.get_config(preset)
  del c["backbone"], c["autoencoder"]      # the teacher's run brings its own
  c.distill = {
      "teacher_workdir": f"../pid_x4_{preset}",
      "student_input": "real",         # the real HR image noised to a schedule time ("backward": own chain)
      "teacher_cfg": 3.0,
      # GAN: weight 0.05 after 100 iterations, non-saturating, on teacher block features, R1 ~ 200.
      "gan_weight": 0.05 if variant == "gan" else 0.0, "gan_warmup": 100,
      "gan_block": min(7, c.model.depth - 1), "r1_weight": 200.0, "r1_sigma": 0.01,
  }
  # Released: lr 1e-5 for student and fake score, 3000 iterations (the student steps on 1 in 6).
  c.train.update({"num_steps": 600, "eval_every": 600, "sample_every": 600, "checkpoint_every": 300})
  c.optim.update({"lr": 1e-5 if preset == "paper" else 5e-5, "warmup_steps": 0, "ema_decay": 0.0})
  if preset == "smoke":
    c.train.update({"num_steps": 6, "eval_every": 6, "sample_every": 6, "checkpoint_every": 6})
    c.distill.gan_warmup = 2
  elif preset == "paper":
    c.train.update({"num_steps": 3000, "eval_every": 500, "sample_every": 500, "checkpoint_every": 500})
  return c
