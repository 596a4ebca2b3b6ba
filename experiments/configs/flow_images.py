"""A small DiT trained by rectified flow on `digits` (class-conditional, CFG) or `image_crops`.

Preset: `smoke | cpu | paper`, optionally `,image_crops` for the photograph crops (unconditional) or
`,image_crops_cond` for the crops conditioned on their source photo (6 classes, CFG, shift 3):
  python -m experiments.main --config experiments/configs/flow_images.py:cpu --workdir runs/digits
  python -m experiments.main --config experiments/configs/flow_images.py:cpu,image_crops --workdir runs/crops
"""
from core.data import image_crops
from experiments.configs import _base

VARIANTS = ("digits", "image_crops", "image_crops_cond")     # the dataset (and its labels)


def get_config(arg: str = "cpu"):
  preset, dataset = _base.parse_arg(arg, VARIANTS)
  c = _base.base(preset)
  c.task = "flow_matching"
  if dataset == "digits":   # 16x16x1, 10 classes; label dropout trains the null class for CFG
    c.data.update({"name": "digits", "config": "r16", "field": "image", "label_field": "label",
                   "eval_split": "test"})
    c.model.update({"kind": "dit", "num_classes": 10, "patch_size": 2})
    c.flow = {"label_drop_prob": 0.1, "cfg_scale": 2.0}
  elif dataset == "image_crops":   # 32x32x3 photograph crops, unconditional
    c.data.update({"name": "image_crops", "config": "s32", "field": "image", "label_field": "",
                   "eval_split": "eval"})
    c.model.update({"kind": "dit", "num_classes": 0, "patch_size": 4})
    c.flow = {"label_drop_prob": 0.0, "cfg_scale": 1.0}
  else:   # the crops conditioned on their source photo: one class per training photo
    # The eval photos are held out, so their crops carry labels the model lacks: they are evaluated
    # with the null label (unconditionally).
    c.data.update({"name": "image_crops", "config": "s32", "field": "image", "label_field": "source",
                   "eval_split": "eval", "unseen_labels_null": True})
    c.model.update({"kind": "dit", "num_classes": len(image_crops.TRAIN_PHOTOS), "patch_size": 4})
    c.flow = {"label_drop_prob": 0.1, "cfg_scale": 4.0}
  c.data.random_flip = dataset != "digits"
  # cpu: sized so `make tables` trains it in ~6 minutes on 2 cores (4.4 steps/s measured).
  c.model.update({"width": 96, "depth": 4, "num_heads": 4, "mlp_ratio": 4.0, "mlp": "gelu",
                  "pos_embed": "sincos", "modulation": "adaln_zero", "attention": "xla"})
  c.flow.update({"time_kind": "logit_normal", "time_mean": 0.0, "time_std": 1.0, "shift": 1.0,
                 "sample_steps": 50, "sample_shift": 1.0, "num_samples": 64, "eval_size": 256})
  if dataset == "image_crops_cond":   # trained and sampled at Flux's shift of about 3 (arXiv 2403.03206)
    c.flow.update({"shift": 3.0, "sample_shift": 3.0})
  c.train.update({"num_steps": 1500, "global_batch_size": 32, "log_every": 100, "eval_every": 500,
                  "sample_every": 500, "checkpoint_every": 500})
  # EMA is not bias-corrected: its horizon (1 / (1 - decay) = 200 steps) must be short next to the run.
  c.optim.update({"lr": 1e-3, "warmup_steps": 100, "weight_decay": 0.0, "ema_decay": 0.995})
  if preset == "smoke":
    c.model.update({"width": 32, "depth": 2, "num_heads": 2})
    c.flow.update({"sample_steps": 4, "num_samples": 16, "eval_size": 32})
    c.train.update({"num_steps": 6, "global_batch_size": 16, "log_every": 2, "eval_every": 3,
                    "sample_every": 3, "checkpoint_every": 3})
    c.optim.update({"warmup_steps": 1})
  elif preset == "paper":   # a DiT-S/2-sized model (arXiv 2212.09748), bf16 compute
    c.model.update({"width": 384, "depth": 12, "num_heads": 6})
    c.train.update({"num_steps": 100000, "global_batch_size": 256, "compute_dtype": "bfloat16",
                    "eval_every": 5000, "sample_every": 5000, "checkpoint_every": 5000})
    c.optim.update({"lr": 1e-4, "warmup_steps": 1000, "ema_decay": 0.9999})
  return c
