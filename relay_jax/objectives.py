"""Training objectives: MDLM masking (`mlm`) and the rollout family (`rollout`, `relay`, `relay_sg`).

`mlm` draws t per example, masks each maskable position with probability t, and weights the masked
positions' cross-entropy by one of `MLM_WEIGHTINGS`:
  "unweighted" (the authors' baseline): t ~ U(0, 1); the plain mean cross-entropy over all masked
    tokens of the batch (heavily masked states weigh more, as they hold more masked tokens).
  "mdlm" (MDLM, arXiv 2406.07524 Eq. 10 with alpha_t = 1 - t): t ~ U(1e-3, 1); each masked
    position's cross-entropy weighted by 1/t, normalised per example by its number of maskable
    positions, then averaged over examples; a model that predicts uniformly over V' tokens has
    expected loss log V'.

The rollout family trains on the states the sampler itself visits (arXiv 2605.22967, authors' code).
A buffer holds one partially revealed example per batch row and its detached relay state h. Each step
runs K rounds: the model sees (x_k, h_k); loss_k is the mean cross-entropy over the positions still
masked; the positions the inference rule would reveal (on detached confidences, with the budget tau
jittered as N(tau, tau_std^2) clipped at 0: one draw per round for the whole batch as the authors
do, or one per row, `TAU_JITTERS`) get the ground truth (teacher forcing); h_{k+1} = h (`relay`),
stop_gradient(h) (`relay_sg`), or nothing (`rollout`: no relay channel). The loss is sum_k loss_k;
gradients cross at most K - 1 relay edges, all inside the step (the buffer's h is detached). The final
x and detached h go back to the buffer; rows with nothing left masked are refilled from the batch
(fresh examples: every maskable position masked, h = 0).
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from relay_jax import unmask

OBJECTIVES = ("mlm", "rollout", "relay", "relay_sg")
MLM_WEIGHTINGS = ("unweighted", "mdlm")       # the first is the authors'
TAU_JITTERS = ("batch", "row")                # the first is the authors'
# apply(params, tokens_BxL, h_BxLxD or None, key or None, clean_BxL or None) -> (logits_BxLxV, h_BxLxD).
# key None = no dropout. clean_BxL is the example's clean sequence, which a block-diffusion model sees as
# context (the x0 half of its [x_t ; x0] input); other models ignore it.
Apply = Callable[..., tuple[jax.Array, jax.Array]]


def token_cross_entropy(logits_BxLxV: jax.Array, target_BxL: jax.Array) -> jax.Array:
  """-log p(target) per position, float32 [B, L]."""
  logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, target_BxL[..., None].astype(jnp.int32), axis=-1)[..., 0]


def mdlm_mask(key: jax.Array, maskable_BxL: jax.Array, t_min: float = 1e-3,
              block_size: int | None = None):
  """(t [B, L], masked [B, L]): each maskable position masked with probability t ~ U(t_min, 1), one t
  per example, or per block of `block_size` positions (block diffusion, BD3-LM arXiv 2503.09573)."""
  k_t, k_m = jax.random.split(key)
  b, length = maskable_BxL.shape
  group = length if block_size is None else block_size
  t_BxG = jax.random.uniform(k_t, (b, length // group), minval=t_min, maxval=1.0)
  t_BxL = jnp.repeat(t_BxG, group, axis=1)
  masked = (jax.random.uniform(k_m, maskable_BxL.shape) < t_BxL) & maskable_BxL
  return t_BxL, masked


def mlm_loss(apply: Apply, params, x0_BxL: jax.Array, maskable_BxL: jax.Array, mask_id: int,
             key: jax.Array, block_size: int | None = None, weighting: str = "unweighted"):
  """(scalar loss, metrics) of one masked batch, weighted by `weighting` (see the module docstring):
  "unweighted" sum CE over masked / #masked over the whole batch; "mdlm" the mean over examples of
  sum_masked CE / t / #maskable."""
  if weighting not in MLM_WEIGHTINGS:
    raise ValueError(f"mlm_loss weighting must be one of {MLM_WEIGHTINGS}, got {weighting!r}")
  k_mask, k_drop = jax.random.split(key)
  # MDLM's t_min keeps its 1/t weight bounded; the unweighted loss has no such weight to bound.
  t_min = 1e-3 if weighting == "mdlm" else 0.0
  t_BxL, masked = mdlm_mask(k_mask, maskable_BxL, t_min=t_min, block_size=block_size)
  x_t = jnp.where(masked, mask_id, x0_BxL)
  logits, _ = apply(params, x_t, None, k_drop, x0_BxL)
  ce = token_cross_entropy(logits, x0_BxL)
  n_masked = jnp.maximum(masked.sum(), 1)
  if weighting == "mdlm":
    per_row = (ce * masked / t_BxL).sum(-1) / jnp.maximum(maskable_BxL.sum(-1), 1)
    loss = per_row.mean()
  else:
    loss = (ce * masked).sum() / n_masked
  accuracy = ((jnp.argmax(logits, -1) == x0_BxL) * masked).sum() / n_masked
  return loss, {"masked_accuracy": accuracy}


def init_buffer(batch_size: int, length: int, width: int) -> dict[str, jax.Array]:
  """An empty buffer: every row counts as finished (no position holds the MASK token, -1 is no
  token at all), so the first step fills all of them."""
  empty = jnp.full((batch_size, length), -1, jnp.int32)
  return {"x": empty, "target": empty, "maskable": jnp.zeros((batch_size, length), bool),
          "h": jnp.zeros((batch_size, length, width), jnp.float32)}


def refill(buffer: dict, x0_BxL: jax.Array, maskable_BxL: jax.Array, mask_id: int) -> dict:
  """Rows with no masked position left start over from the batch's fresh examples (h = 0)."""
  done_B = ~(buffer["x"] == mask_id).any(-1)
  fresh = {"x": jnp.where(maskable_BxL, mask_id, x0_BxL).astype(jnp.int32),
           "target": x0_BxL.astype(jnp.int32), "maskable": maskable_BxL,
           "h": jnp.zeros_like(buffer["h"])}
  pick = lambda new, old: jnp.where(done_B.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)
  return jax.tree.map(pick, fresh, buffer)


def jitter_tau(key: jax.Array, tau: float, tau_std: float, batch_size: int,
               tau_jitter: str = "batch") -> jax.Array:
  """A round's reveal budgets tau_B [B], N(tau, tau_std^2) clipped at 0: one draw shared by the
  whole batch ("batch", the authors') or one per row ("row")."""
  if tau_jitter not in TAU_JITTERS:
    raise ValueError(f"tau_jitter must be one of {TAU_JITTERS}, got {tau_jitter!r}")
  draws = 1 if tau_jitter == "batch" else batch_size
  noise_B = jnp.broadcast_to(jax.random.normal(key, (draws,)), (batch_size,))
  return jnp.maximum(tau + tau_std * noise_B, 0.0)


def rollout_loss(apply: Apply, params, buffer: dict, x0_BxL: jax.Array, maskable_BxL: jax.Array, *,
                 objective: str, mask_id: int, rounds: int, tau: float, tau_std: float,
                 key: jax.Array, select: Callable | None = None, tau_jitter: str = "batch"):
  """K rounds of truncated BPTT from the buffer. Returns (loss, metrics, new buffer).

  Args:
    apply: see `Apply`; for "rollout" it ignores h.
    buffer: {"x", "target", "maskable": [B, L], "h": [B, L, D]} from `init_buffer` or a last step.
    x0_BxL, maskable_BxL: this step's fresh examples (used only by rows that are refilled).
    objective: "rollout", "relay" or "relay_sg".
    rounds: K. tau, tau_std: the training reveal budget's mean and jitter.
    tau_jitter: "batch" (one jittered tau per round for the whole batch) or "row" (`jitter_tau`).
    select: (conf, masked, tau_B) -> reveal; default `unmask.select_cumulative`.
  """
  if objective not in OBJECTIVES[1:]:
    raise ValueError(f"rollout_loss objective must be one of {OBJECTIVES[1:]}, got {objective!r}")
  select = select or unmask.select_cumulative
  # Rows that start a fresh example this step: how many new examples the buffer sees per step.
  metrics = {"refilled_fraction": jnp.mean(~(buffer["x"] == mask_id).any(-1))}
  buf = refill(buffer, x0_BxL, maskable_BxL, mask_id)
  x, h, target = buf["x"], buf["h"], buf["target"]
  total = 0.0
  for k in range(rounds):
    k_drop, k_tau = jax.random.split(jax.random.fold_in(key, k))
    logits, h_new = apply(params, x, None if objective == "rollout" else h, k_drop, target)
    masked = x == mask_id
    ce = token_cross_entropy(logits, target)
    n_masked = jnp.maximum(masked.sum(), 1)
    total = total + (ce * masked).sum() / n_masked
    metrics[f"masked_accuracy_round{k + 1}"] = ((jnp.argmax(logits, -1) == target) * masked).sum() / n_masked
    conf, _ = unmask.confidence(jax.lax.stop_gradient(logits))
    tau_B = jitter_tau(k_tau, tau, tau_std, x.shape[0], tau_jitter)
    x = jnp.where(select(conf, masked, tau_B), target, x)    # teacher forcing
    h = jax.lax.stop_gradient(h_new) if objective != "relay" else h_new
  metrics["buffer_masked_fraction"] = (x == mask_id).sum() / jnp.maximum(buf["maskable"].sum(), 1)
  new_buffer = {**buf, "x": x, "h": jax.lax.stop_gradient(h).astype(jnp.float32)}
  return total, metrics, new_buffer
