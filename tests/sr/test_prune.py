"""sr/prune.py: units of zero importance are removed without changing the output; the plan ranks
units over blocks; a pruned DiT rebuilds from its parameters; the narrow DC-AE decoder is cut right."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from core.nn.dit import DiT
from core.nn.mlp import MixFFN
from sr import dcae, prune
from tests.core.nn.random_params import random_params

D, HEADS, DEPTH = 32, 4, 3
HEAD_DIM = D // HEADS


def _dit(**kw):
  return DiT(patch_size=1, width=D, depth=DEPTH, num_heads=HEADS, mlp_ratio=2.5, pos_embed="none",
             modulation="adaln_single", mlp="mixffn", attn_impl="linear", **kw)


def _inputs(rng, b=3):
  z = jnp.asarray(rng.normal(size=(b, 4, 5, 6)), jnp.float32)
  t = jnp.asarray(rng.uniform(0.1, 0.9, size=b), jnp.float32)
  return z, t


def test_removing_units_of_zero_importance_leaves_the_output_unchanged(rng):
  """Head 1 of block 0 feeds zero rows of attn/out, Mix-FFN channels {0, 5} of block 1 feed zero rows
  of fc2, and block 2's gates are zero: each scores exactly 0, every other unit more, and removing
  exactly those gives the same velocity from a smaller model."""
  model = _dit()
  z, t = _inputs(rng)
  p = random_params(model, rng, z, t, scale=0.3)
  p["block_0"]["attn"]["out"]["kernel"] = p["block_0"]["attn"]["out"]["kernel"].at[HEAD_DIM:2 * HEAD_DIM].set(0)
  p["block_1"]["mlp"]["fc2"]["kernel"] = p["block_1"]["mlp"]["fc2"]["kernel"].at[jnp.array([0, 5])].set(0)
  gates = np.r_[2 * D:3 * D, 5 * D:6 * D]          # adaLN-single rows gate1 and gate2
  p["t_block"]["kernel"] = p["t_block"]["kernel"].at[:, gates].set(0)
  p["t_block"]["bias"] = p["t_block"]["bias"].at[gates].set(0)
  p["block_2"]["adaln"]["scale_shift_table"] = p["block_2"]["adaln"]["scale_shift_table"].at[
      jnp.array([2, 5])].set(0)
  scores = prune.importance(model, p, z, t)
  assert scores.heads[0][1] == 0 and np.all(np.delete(scores.heads[0], 1) > 0)
  assert np.all(scores.mlp[1][[0, 5]] == 0) and np.all(np.delete(scores.mlp[1], [0, 5]) > 0)
  assert scores.blocks[2] == 0 and np.all(scores.blocks[:2] > 0)
  hidden = p["block_0"]["mlp"]["fc2"]["kernel"].shape[0]
  the_plan = prune.plan(scores, head_fraction=1 / (HEADS * 2), mlp_fraction=2 / (2 * hidden), num_blocks=1)
  assert the_plan.blocks == [0, 1]
  assert list(the_plan.heads[0]) == [0, 2, 3] and len(the_plan.heads[1]) == HEADS
  assert set(range(hidden)) - set(the_plan.mlp[1]) == {0, 5} and len(the_plan.mlp[0]) == hidden
  pruned = prune.apply_plan(p, the_plan, HEAD_DIM)
  small = prune.with_structure(model, pruned)
  assert small.block_heads == (3, 4) and small.block_mlp_hidden == (hidden, hidden - 2)
  assert jax.tree.map(jnp.shape, pruned) == jax.tree.map(
      jnp.shape, meta.unbox(jax.eval_shape(lambda: small.init(jax.random.PRNGKey(0), z, t))["params"]))
  # Removing exact zeros from a sum only changes its float32 rounding (order eps x the output).
  want = model.apply({"params": p}, z, t)
  np.testing.assert_allclose(small.apply({"params": pruned}, z, t), want, rtol=1e-4,
                             atol=1e-5 * float(jnp.abs(want).max()))
  # prune() chooses the same units by itself.
  again, params_again, _ = prune.prune(model, p, z, t, head_fraction=1 / (HEADS * 2),
                                       mlp_fraction=2 / (2 * hidden), num_blocks=1)
  assert again.block_heads == small.block_heads and again.block_mlp_hidden == small.block_mlp_hidden
  np.testing.assert_array_equal(params_again["block_1"]["mlp"]["fc2"]["kernel"],
                                pruned["block_1"]["mlp"]["fc2"]["kernel"])


def test_plan_ranks_units_over_all_blocks_and_keeps_a_channel(rng):
  heads = [rng.uniform(1, 2, size=4), rng.uniform(0, 1, size=4), rng.uniform(0, 1, size=4)]
  mlp = [rng.uniform(0, 1, size=6) for _ in range(3)]
  mlp[2][:] = -1.0                                     # every channel of block 2 ranks last
  scores = prune.Importance(heads, mlp, np.array([0.5, 0.1, 0.9]))
  the_plan = prune.plan(scores, head_fraction=0.5, mlp_fraction=0.5, num_blocks=1)
  assert the_plan.blocks == [0, 2]
  # 8 heads remain, 4 removed: block 2's (all below 1), none of block 0's (all above 1).
  assert len(the_plan.heads[0]) == 4 and len(the_plan.heads[2]) == 0
  assert len(the_plan.mlp[2]) == 1 and the_plan.mlp[2][0] in range(6)     # at least one channel
  with pytest.raises(ValueError, match="num_blocks"):
    prune.plan(scores, head_fraction=0.1, mlp_fraction=0.1, num_blocks=3)
  with pytest.raises(ValueError, match="head_fraction"):
    prune.plan(scores, head_fraction=1.0, mlp_fraction=0.1, num_blocks=0)


def test_a_block_without_heads_keeps_its_mlp(rng):
  model = _dit()
  z, t = _inputs(rng)
  p = random_params(model, rng, z, t, scale=0.3)
  hidden = p["block_0"]["mlp"]["fc2"]["kernel"].shape[0]
  every = np.arange(hidden)
  the_plan = prune.Plan([0, 1, 2], {0: np.arange(0), 1: np.arange(HEADS), 2: np.arange(HEADS)},
                        {i: every for i in range(3)})
  pruned = prune.apply_plan(p, the_plan, HEAD_DIM)
  assert "attn" not in pruned["block_0"]
  small = prune.with_structure(model, pruned)
  assert small.block_heads == (0, HEADS, HEADS)
  assert np.all(np.isfinite(small.apply({"params": pruned}, z, t)))


def test_mixffn_halves_are_cut_together(rng):
  """shrink_decoder keeps the first channels of both GLU halves: a Mix-FFN whose other hidden
  channels feed zero rows of fc2 computes the same at the narrower hidden width."""
  x = jnp.asarray(rng.normal(size=(2, 12, 6)), jnp.float32)
  full, small = MixFFN(8), MixFFN(3)
  p = random_params(full, rng, x, (3, 4))
  p["fc2"]["kernel"] = p["fc2"]["kernel"].at[3:].set(0)
  cut = prune.shrink_decoder({"glumbconv": p}, {"glumbconv": random_params(small, rng, x, (3, 4))})
  np.testing.assert_allclose(small.apply({"params": cut["glumbconv"]}, x, (3, 4)),
                             full.apply({"params": p}, x, (3, 4)), rtol=1e-5, atol=1e-5)


def test_narrow_decoder_widths_and_cut(rng):
  spec = dcae.Spec((8, 16, 32, 64), (0, 1, 1, 1), (0, 1, 1, 1), ("res", "res", "evit", "evit"),
                   latent_channels=8, head_dim=32)
  assert prune.narrow_widths(spec.widths, spec.blocks, 32, 0.5) == (4, 8, 32, 32)
  assert prune.narrow_widths((128, 256, 512, 512, 1024, 1024), ("res",) * 3 + ("evit",) * 3, 32,
                             0.5625) == (72, 144, 288, 288, 576, 576)
  z = jnp.asarray(rng.normal(size=(1, 2, 2, 8)), jnp.float32)
  full = dcae.Decoder(spec)
  p = random_params(full, rng, z, scale=0.2)
  assert jax.tree.map(jnp.array_equal, prune.shrink_decoder(p, p), p) == jax.tree.map(lambda _: True, p)
  narrow = dcae.Decoder(dataclasses.replace(spec, widths=(4, 8, 32, 32)))
  shapes = meta.unbox(jax.eval_shape(lambda: narrow.init(jax.random.PRNGKey(0), z))["params"])
  cut = prune.shrink_decoder(p, shapes)
  assert jax.tree.map(jnp.shape, cut) == jax.tree.map(lambda s: s.shape, shapes)
  assert narrow.apply({"params": cut}, z).shape == (1, 16, 16, 3)
  with pytest.raises(ValueError, match="cannot cut"):
    prune.shrink_decoder(cut, p)
