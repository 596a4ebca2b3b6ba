"""Structured pruning of a (Linear)DiT: attention heads, Mix-FFN channels and whole blocks, by importance.

SANA-SR (arXiv 2605.23451) prunes its one-step model to 344 M parameters; its criterion is not
public. Ours, measured on calibration inputs (design doc sana_sr.md, "Reproduction at our scale"):
  head h of block i      E|o_h| summed over the head's dims x the norms of its rows of attn/out
  Mix-FFN channel j      E|a_j silu(g_j)| x the norm of row j of mlp/fc2
  block i                E||block(x) - x|| / E||x||, the size of its residual update
(the activation times the weight it feeds, the usual magnitude criterion; E over calibration tokens).
A unit whose importance is exactly zero contributes nothing, so removing it leaves the output as it is.

Parameter surgery keeps the model a `core.nn.DiT`: pruned blocks keep their head width (width /
num_heads) and get their own head count and hidden width (`block_heads`, `block_mlp_hidden`), which
`structure` reads back from the parameters' shapes; removed blocks are dropped and the rest renumbered.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.core import meta

from core.nn.dit import DiT, DiTBlock


def _blocks(params) -> list[str]:
  """The block names block_0, block_1, ... in order."""
  names = [k for k in params if k.startswith("block_")]
  return sorted(names, key=lambda k: int(k.split("_")[1]))


def structure(params, head_dim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(block_heads, block_mlp_hidden) of a DiT's (possibly pruned) parameters."""
  heads, hidden = [], []
  for name in _blocks(params):
    block = params[name]
    heads.append(block["attn"]["out"]["kernel"].shape[0] // head_dim if "attn" in block else 0)
    hidden.append(block["mlp"]["fc2"]["kernel"].shape[0])
  return tuple(heads), tuple(hidden)


def with_structure(model: DiT, params) -> DiT:
  """`model` with the per-block sizes of `params` (a pruned model's) and no `depth` mismatch."""
  heads, hidden = structure(params, model.width // model.num_heads)
  return model.clone(depth=len(heads), block_heads=heads, block_mlp_hidden=hidden)


@dataclasses.dataclass
class Importance:
  """Per block: heads [H_i], mlp [hidden_i], and the block's own score."""
  heads: list[np.ndarray]
  mlp: list[np.ndarray]
  blocks: np.ndarray


def importance(model: DiT, params, x_BxHxWxC: jax.Array, t_B: jax.Array) -> Importance:
  """The importance scores of `params`' units on calibration inputs (x_t, t), as the module
  docstring defines them. model must be `with_structure(model, params)` for a pruned model."""
  params = meta.unbox(params)
  head_dim = model.width // model.num_heads
  captured = {}

  def interceptor(next_fun, args, kwargs, context):
    module, path = context.module, tuple(context.module.path)
    out = next_fun(*args, **kwargs)
    if context.method_name != "__call__":
      return out
    if isinstance(module, DiTBlock) and not kwargs.get("modulated_input_only"):
      x = args[0]
      captured[path] = (jnp.sqrt(jnp.sum((out - x) ** 2, -1)).mean(), jnp.sqrt(jnp.sum(x ** 2, -1)).mean())
    elif isinstance(module, nn.Dense) and path[-1] in ("out", "fc2") and path[-2] in ("attn", "mlp"):
      x = args[0]
      captured[path] = jnp.abs(x).reshape(-1, x.shape[-1]).mean(0)
    return out

  def run(p, x, t):
    with nn.intercept_methods(interceptor):
      model.apply({"params": p}, x, t)
    return dict(captured)

  stats = jax.jit(run)(params, x_BxHxWxC, t_B)
  heads, mlp, blocks = [], [], []
  for name in _blocks(params):
    block = params[name]
    if "attn" in block:
      w = block["attn"]["out"]["kernel"]                     # [heads * head_dim, D]
      score = np.asarray(stats[(name, "attn", "out")] * jnp.linalg.norm(w, axis=1))
      heads.append(score.reshape(-1, head_dim).sum(1))
    else:
      heads.append(np.zeros((0,)))
    w = block["mlp"]["fc2"]["kernel"]                        # [hidden, D]
    mlp.append(np.asarray(stats[(name, "mlp", "fc2")] * jnp.linalg.norm(w, axis=1)))
    update, size = stats[(name,)]
    blocks.append(float(update / size))
  return Importance(heads, mlp, np.asarray(blocks))


@dataclasses.dataclass
class Plan:
  """What to keep: per surviving original block index, the kept head and channel indices."""
  blocks: list[int]
  heads: dict[int, np.ndarray]
  mlp: dict[int, np.ndarray]


def plan(scores: Importance, *, head_fraction: float, mlp_fraction: float, num_blocks: int) -> Plan:
  """Removes the `num_blocks` least important blocks, then the lowest-scoring `head_fraction` of
  the remaining heads and `mlp_fraction` of the remaining Mix-FFN channels, ranked over all blocks
  together (each block keeps at least one channel; a block may lose every head)."""
  for name, f in (("head_fraction", head_fraction), ("mlp_fraction", mlp_fraction)):
    if not 0.0 <= f < 1.0:
      raise ValueError(f"{name}={f}; expected a fraction in [0, 1)")
  n = len(scores.blocks)
  if not 0 <= num_blocks < n:
    raise ValueError(f"num_blocks={num_blocks}; expected 0 <= num_blocks < {n} (the model's blocks)")
  keep_blocks = sorted(np.argsort(scores.blocks, kind="stable")[num_blocks:].tolist())

  def keep(per_block, fraction, at_least):
    flat = [(s, i, j) for i in keep_blocks for j, s in enumerate(per_block[i])]
    drop = int(fraction * len(flat))
    dropped = {(i, j) for _, i, j in sorted(flat, key=lambda e: e[0])[:drop]}
    out = {}
    for i in keep_blocks:
      kept = [j for j in range(len(per_block[i])) if (i, j) not in dropped]
      if len(kept) < at_least:            # give back the block's best units
        kept = sorted(np.argsort(-per_block[i], kind="stable")[:at_least].tolist())
      out[i] = np.asarray(kept, np.int32)
    return out

  return Plan(keep_blocks, keep(scores.heads, head_fraction, 0), keep(scores.mlp, mlp_fraction, 1))


def _take(a, idx, axis):
  """a's entries idx along axis, taken on the host (an eager jnp.take compiled once per shape)."""
  return jnp.asarray(np.take(np.asarray(a), np.asarray(idx, np.int64), axis=axis))


def _prune_attention(attn: dict, heads: np.ndarray, head_dim: int, total: int) -> dict | None:
  """attn params keeping `heads` (of `total`): qkv's columns of q, k and v, out's rows."""
  if len(heads) == 0:
    return None
  cols = (heads[:, None] * head_dim + np.arange(head_dim)).ravel()
  qkv_cols = np.concatenate([cols + part * total * head_dim for part in range(3)])
  out = dict(attn)
  out["qkv"] = {"kernel": _take(attn["qkv"]["kernel"], qkv_cols, 1),
                "bias": _take(attn["qkv"]["bias"], qkv_cols, 0)}
  out["out"] = {**attn["out"], "kernel": _take(attn["out"]["kernel"], cols, 0)}
  return out


def _prune_mixffn(mlp: dict, channels: np.ndarray) -> dict:
  """Mix-FFN params keeping hidden channels `channels`: fc1 / dwconv's a and gate halves, fc2's rows."""
  hidden = mlp["fc2"]["kernel"].shape[0]
  both = np.concatenate([channels, channels + hidden])
  return {"fc1": {"kernel": _take(mlp["fc1"]["kernel"], both, 1), "bias": _take(mlp["fc1"]["bias"], both, 0)},
          "dwconv": {"kernel": _take(mlp["dwconv"]["kernel"], both, 3),
                     "bias": _take(mlp["dwconv"]["bias"], both, 0)},
          "fc2": {"kernel": _take(mlp["fc2"]["kernel"], channels, 0)}}


def apply_plan(params, the_plan: Plan, head_dim: int) -> dict:
  """A DiT's (unboxed) params pruned by `the_plan` (Mix-FFN blocks; LinearDiT's layout)."""
  params = meta.unbox(params)
  out = {k: v for k, v in params.items() if not k.startswith("block_")}
  names = _blocks(params)
  for new, old in enumerate(the_plan.blocks):
    block = dict(params[names[old]])
    if "mlp" not in block or "dwconv" not in block["mlp"]:
      raise ValueError("apply_plan prunes Mix-FFN blocks (mlp='mixffn'); this DiT has another MLP")
    total = block["attn"]["out"]["kernel"].shape[0] // head_dim if "attn" in block else 0
    attn = _prune_attention(block["attn"], the_plan.heads[old], head_dim, total) if total else None
    if attn is None:
      block.pop("attn", None)
    else:
      block["attn"] = attn
    block["mlp"] = _prune_mixffn(block["mlp"], the_plan.mlp[old])
    out[f"block_{new}"] = block
  return out


def prune(model: DiT, params, x_BxHxWxC: jax.Array, t_B: jax.Array, *, head_fraction: float,
          mlp_fraction: float, num_blocks: int) -> tuple[DiT, dict, Importance]:
  """(the pruned model, its params, the scores it was pruned by): importance on (x, t), a plan,
  the surgery."""
  model = with_structure(model, meta.unbox(params))
  scores = importance(model, params, x_BxHxWxC, t_B)
  the_plan = plan(scores, head_fraction=head_fraction, mlp_fraction=mlp_fraction, num_blocks=num_blocks)
  pruned = apply_plan(params, the_plan, model.width // model.num_heads)
  return with_structure(model, pruned), pruned, scores


# ------------------------------------------------------------------------------------------------
# The DC-AE decoder at a fraction of its width (the encoder-free variant's, design doc sana_sr.md)


def narrow_widths(widths: tuple[int, ...], blocks: tuple[str, ...], head_dim: int,
                  fraction: float) -> tuple[int, ...]:
  """Each stage's width times `fraction`, rounded up where the design needs it: EfficientViT stages
  to whole heads of head_dim, and every stage below the top to a multiple of w_next / gcd(w_next, 4),
  so that the upsampling shortcut (4 w_i channels from w_next by repetition) stays exact."""
  out = []
  for i in reversed(range(len(widths))):
    w = max(1, int(round(widths[i] * fraction)))
    unit = head_dim if blocks[i] == "evit" else 1
    if out:
      step = out[-1] // math.gcd(out[-1], 4)
      unit = unit * step // math.gcd(unit, step)
    out.append(-(-w // unit) * unit)
  return tuple(reversed(out))


def _halves(a, n: int, axis: int):
  """The first n entries of each half of `axis` (a GLU's (value, gate) or LiteMLA's two branches)."""
  half = a.shape[axis] // 2
  return _take(a, np.concatenate([np.arange(n), half + np.arange(n)]), axis)


def shrink_decoder(full, small) -> dict:
  """The narrow decoder's parameters (shapes of `small`) cut from the trained one's: every axis keeps
  its first entries (each stage's first channels; whole heads, since LiteMLA lays channels out head
  by head), except the axes made of two halves: Mix-FFN's fc1 / dwconv outputs (value, gate) and
  LiteMLA's projection input (the two branches), which keep the first entries of each half."""
  full, small = meta.unbox(full), meta.unbox(small)

  def cut(path, f, s):
    names = [getattr(k, "key", str(k)) for k in path]
    f = jnp.asarray(f)
    if f.ndim != s.ndim or any(a < b for a, b in zip(f.shape, s.shape)):
      raise ValueError(f"cannot cut {'/'.join(names)} {f.shape} down to {s.shape}")
    split = None
    if "glumbconv" in names and names[-2] in ("fc1", "dwconv"):
      split = f.ndim - 1
    elif names[-2:] == ["proj", "kernel"] and "attn" in names:
      split = 2
    for axis, n in enumerate(s.shape):
      f = _halves(f, n // 2, axis) if axis == split else _take(f, np.arange(n), axis)
    return f.astype(s.dtype)

  return jax.tree_util.tree_map_with_path(cut, full, small)
