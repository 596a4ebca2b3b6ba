"""flowrl.grpo against numpy and toy policies; the flow_grpo task through the trainer (sharded, LoRA)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import experiments.tasks  # noqa: F401  (registers the tasks)
from core import flow, sharding, train
from experiments.configs import precise_2d, precise_digits
from flowrl import grpo, rewards, samplers
from flowrl import task as grpo_task

EPS32 = float(np.finfo(np.float32).eps)


def _f32(a):
  """a rounded to float32 (as float64): the float64 references see exactly what the float32 code sees."""
  return np.asarray(a, np.float32).astype(np.float64)


def test_group_advantages_match_numpy(rng):
  # Each group's std is its scale, in [0.5, 3]: none is near 0, where float32's cancellation in
  # r - mean would reach rtol (for 6 plain normals, a std below 0.01 has probability ~1e-8).
  z = rng.standard_normal((5, 6))
  z = (z - z.mean(1, keepdims=True)) / z.std(1, keepdims=True)
  r = _f32(rng.normal(size=(5, 1)) + z * rng.uniform(0.5, 3, (5, 1)))
  r[2] = 1.5                                                # a group with one reward: advantage 0
  r[3, 0] = 40.0                                            # an outlier the clip catches
  for global_std in (False, True):
    std = r.std() if global_std else r.std(axis=1, keepdims=True)
    want = np.clip((r - r.mean(1, keepdims=True)) / (std + 1e-4), -1.5, 1.5)
    got = grpo.group_advantages(jnp.asarray(r, jnp.float32), global_std=global_std, clip=1.5)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(grpo.group_advantages(jnp.asarray(r, jnp.float32)))[2] == 0)
  with pytest.raises(ValueError, match="num_groups, group_size"):
    grpo.group_advantages(jnp.ones(6))


def test_clipped_surrogate_matches_numpy_off_policy(rng):
  log_ratio, adv = _f32(rng.normal(0, 0.2, (4, 7))), _f32(rng.standard_normal(7))
  e = float(_f32(rng.uniform(0.05, 0.2)))
  ratio = np.exp(log_ratio)
  terms = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - e, 1 + e))
  got = grpo.clipped_surrogate(jnp.asarray(log_ratio, jnp.float32), jnp.asarray(adv, jnp.float32), e)
  # The terms have both signs, so their mean can be ~0 and rtol alone failed 1 draw in 500: float32
  # makes each term within a few ulp and the mean of 28 within 28 ulp more, of mean |term|.
  np.testing.assert_allclose(got, terms.mean(), rtol=1e-5, atol=64 * EPS32 * np.abs(terms).mean())


def test_surrogate_gradient_moves_a_gaussian_policy_toward_the_high_advantage_sample(rng):
  theta = jnp.float32(rng.normal())
  good, bad = theta + rng.uniform(0.5, 1.5), theta - rng.uniform(0.5, 1.5)
  x = jnp.array([[good], [bad]], jnp.float32)
  adv = jnp.array([1.0, -1.0])

  def loss(theta):
    logp = samplers.gaussian_log_prob(x, jnp.full_like(x, theta), 0.7)
    return grpo.clipped_surrogate(logp - jax.lax.stop_gradient(logp), adv, 1e-4)

  assert float(loss(theta)) == pytest.approx(0.0, abs=1e-6)    # ratio 1: -mean(A) = 0
  step = -jax.grad(loss)(theta)
  assert float(step) > 0                                      # toward `good` (above theta)
  # The policy gradient -mean(A d log p / d theta) = mean(A (x - theta)) / std^2, exactly.
  np.testing.assert_allclose(step, ((good - theta) - (bad - theta)) / 2 / 0.49, rtol=1e-5)


def test_ratio_norm_leaves_the_noise_times_mean_shift_and_kl_matches_numpy(rng):
  mean_old, dmu = rng.standard_normal((3, 8)), rng.normal(0, 0.1, (3, 8))
  std, z = float(_f32(rng.uniform(0.1, 1.0))), rng.standard_normal((3, 8))
  x = mean_old + std * z
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  log_ratio = (samplers.gaussian_log_prob(f32(x), f32(mean_old + dmu), std)
               - samplers.gaussian_log_prob(f32(x), f32(mean_old), std))
  got = grpo.ratio_norm(log_ratio, f32(mean_old + dmu), f32(mean_old), std)
  # The references use the noise and shift of the float32-rounded inputs: rounding mean_old + dmu
  # moves dmu by up to 2e-7, a relative change of 1e-5 already where |dmu| ~ 0.02.
  x, mean_new, mean_old = _f32(x), _f32(mean_old + dmu), _f32(mean_old)
  z, dmu = (x - mean_old) / std, mean_new - mean_old
  np.testing.assert_allclose(got, (z * dmu).mean(1), rtol=1e-3, atol=1e-5)
  kl = grpo.kl_to_reference(f32(mean_new), f32(mean_old), std)
  np.testing.assert_allclose(kl, (dmu ** 2).mean(1) / (2 * std ** 2), rtol=1e-5)


def test_choose_steps_draws_distinct_steps_inside_the_mask_uniformly(key):
  mask = jnp.array([False, True, True, False, True, True, True, False])
  draws = 3000
  idx = np.asarray(jax.vmap(lambda k: grpo.choose_steps(k, mask, 3))(jax.random.split(key, draws)))
  assert idx.shape == (draws, 3)
  assert np.all(np.sort(idx, 1)[:, 1:] != np.sort(idx, 1)[:, :-1]) and np.all(np.asarray(mask)[idx])
  counts = np.bincount(idx.ravel(), minlength=8)[np.asarray(mask)]
  # Each allowed step is chosen with probability 3/5 per draw: counts ~ Binomial(3000, 3/5). A
  # two-sided p-value below 2e-7 for any of the 5 keeps the false alarms below 1e-6 per run;
  # it flags a frequency off by about 0.05.
  p_values = [stats.binomtest(int(c), draws, 3 / 5).pvalue for c in counts]
  assert min(p_values) > 2e-7, (counts, p_values)
  with pytest.raises(ValueError, match="num_train"):
    grpo.choose_steps(jax.random.PRNGKey(0), mask, 9)


def test_window_start_slides_and_cycles_or_is_random(key):
  starts = [int(grpo.window_start(i, None, num_positions=4, kind="sliding", every=2)) for i in range(10)]
  assert starts == [0, 0, 1, 1, 2, 2, 3, 3, 0, 0]
  # 100 uniform draws miss one of 4 positions with probability <= 4 (3/4)^100 < 1e-12.
  drawn = jax.vmap(lambda k: grpo.window_start(0, k, num_positions=4, kind="random"))(
      jax.random.split(key, 100))
  assert set(np.asarray(drawn).tolist()) == {0, 1, 2, 3}
  with pytest.raises(ValueError, match="window kind"):
    grpo.window_start(0, None, num_positions=4, kind="fixed")


def test_group_noise_is_shared_within_a_group_only_when_asked(key):
  same = grpo.group_noise(key, 3, 4, (2,), same_noise=True).reshape(3, 4, 2)
  assert np.all(same == same[:, :1]) and not np.allclose(same[0], same[1])
  own = grpo.group_noise(key, 3, 4, (2,), same_noise=False).reshape(3, 4, 2)
  assert not np.allclose(own[:, 0], own[:, 1])


def test_policy_loss_gradient_is_the_advantage_weighted_log_prob_gradient(rng):
  """A velocity v = theta (a constant vector): policy_loss's gradient equals that of
  -mean_{k, b} A_b log p_theta(x_{k+1} | x_k) over the chosen steps, written out independently."""
  theta0 = jnp.asarray(rng.standard_normal(3), jnp.float32)
  x_T = jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)
  grid = flow.time_grid(6, shift=2.0)
  key = jax.random.key(int(rng.integers(1 << 30)))
  adv = jnp.asarray(rng.standard_normal(6), jnp.float32)
  steps = jnp.array([0, 3, 2])
  for method, eta in (("precise", 1.5), ("flow_grpo", 0.7)):
    traj = samplers.sample(lambda x, t: jnp.broadcast_to(theta0, x.shape), x_T, grid, key,
                           method=method, eta=eta)

    def loss(theta, beta=0.0):
      fn = lambda x, t: jnp.broadcast_to(theta, x.shape)
      ref = lambda x, t: jnp.zeros_like(x)
      return grpo.policy_loss(fn, traj, adv, steps, method=method, eta=eta, clip_range=1e-4,
                              beta=beta, ref_velocity_fn=ref)

    def reference(theta):
      total = 0.0
      for k in np.asarray(steps):
        t, s = float(grid[k]), float(grid[k + 1])
        x = traj.xs[k]
        _, mean, std = samplers.sde_step(method, x, jnp.broadcast_to(theta, x.shape), t, s,
                                         jnp.zeros_like(x), eta)
        total = total - (adv * samplers.gaussian_log_prob(traj.xs[k + 1], mean, std)).mean()
      return total / len(steps)

    value, metrics = loss(theta0)
    np.testing.assert_allclose(value, -adv.mean(), rtol=1e-5, atol=1e-6)
    assert float(metrics["clip_frac"]) == 0 and float(metrics["kl"]) == 0
    assert float(metrics["grad_frac"]) == 1      # on-policy: ratio 1, every advantage nonzero
    np.testing.assert_allclose(jax.grad(lambda p: loss(p)[0])(theta0), jax.grad(reference)(theta0),
                               rtol=1e-4, atol=1e-6)
    # beta > 0 adds the KL to the zero-velocity reference.
    with_kl, metrics = loss(theta0, beta=0.1)
    assert float(metrics["kl"]) > 0
    # value + 0.1 kl may cancel to ~0: a float32 sum is exact to an ulp of its summands' size.
    np.testing.assert_allclose(with_kl, value + 0.1 * metrics["kl"], rtol=1e-6,
                               atol=4 * EPS32 * (abs(float(value)) + 0.1 * float(metrics["kl"])))
  with pytest.raises(ValueError, match="ref_velocity_fn"):
    grpo.policy_loss(lambda x, t: x, traj, adv, steps, method="precise", eta=1.5, clip_range=1e-4,
                     beta=0.1)


def test_policy_loss_off_policy_uses_the_old_log_probs_and_clips(rng):
  """Trajectories from theta0, policy theta1: the loss is PPO's clipped surrogate of
  exp(log p_theta1 - log p_theta0) per step and example, recomputed here in float64 numpy."""
  theta0 = rng.standard_normal(3).astype(np.float32)
  theta1 = theta0 + rng.uniform(0.05, 0.2, 3).astype(np.float32) * rng.choice([-1, 1], 3)
  x_T = jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)
  grid = flow.time_grid(5)
  adv = rng.standard_normal(8).astype(np.float32)
  steps = jnp.array([1, 3])
  eta, clip = 1.5, 1e-2
  const = lambda theta: (lambda x, t: jnp.broadcast_to(jnp.asarray(theta), x.shape))
  traj = samplers.sample(const(theta0), x_T, grid, jax.random.key(int(rng.integers(1 << 30))),
                         method="precise", eta=eta)
  value, metrics = grpo.policy_loss(const(theta1), traj, jnp.asarray(adv), steps, method="precise",
                                    eta=eta, clip_range=clip)
  xs, g = np.asarray(traj.xs, np.float64), np.asarray(grid, np.float64)
  terms, ratios = [], []
  for k in np.asarray(steps):
    t, s = g[k], g[k + 1]
    r = s * (1 - t) / (t * (1 - s))
    std = np.sqrt(s ** 2 * (1 - r ** (eta ** 2)))
    logp = {}
    for name, theta in (("old", theta0), ("new", theta1)):
      x0_hat, eps_hat = xs[k] - t * theta, xs[k] + (1 - t) * theta
      mean = (1 - s) * x0_hat + np.sqrt(s ** 2 - std ** 2) * eps_hat
      logp[name] = (-0.5 * ((xs[k + 1] - mean) / std) ** 2 - np.log(std)
                    - 0.5 * np.log(2 * np.pi)).mean(1)
    ratio = np.exp(logp["new"] - logp["old"])
    terms.append(np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - clip, 1 + clip)))
    ratios.append(ratio)
  # The terms have both signs, so their mean can be ~0 (rtol alone failed 1 draw in 7000): the
  # atol is 4 times the float32 log-ratios' error (measured <= 2.3e-6) times mean |term|.
  np.testing.assert_allclose(float(value), np.mean(terms), rtol=2e-4,
                             atol=1e-5 * np.abs(terms).mean())
  # A ratio within float32 rounding of 1 +- clip may be counted either way (4 draws in 1000 have one
  # within 1e-5); every other ratio must be counted exactly.
  off = np.abs(np.concatenate(ratios) - 1)
  band = 3e-5
  sure, maybe = np.mean(off > clip + band), np.mean(off > clip - band)
  assert sure <= float(metrics["clip_frac"]) <= maybe, (float(metrics["clip_frac"]), sure, maybe)
  # Gradient carriers: the unclipped branch of PPO's max (A > 0 below 1 + e, A < 0 above 1 - e),
  # with the same rounding band at the boundary.
  r_KxB = np.stack(ratios)
  alive = lambda b: np.mean(((adv > 0) & (r_KxB <= 1 + clip + b)) | ((adv < 0) & (r_KxB >= 1 - clip - b)))
  assert alive(-band) <= float(metrics["grad_frac"]) <= alive(band)
  # The change is big enough to clip: |log r| has sd >= 0.014 (step 1) and 0.043 (step 3) per
  # example, so no ratio beyond the band has probability < 1e-8.
  assert 0 < sure


def test_rewards_have_their_documented_maximum(rng):
  angle = rng.uniform(0, 2 * np.pi, 5)
  ring = lambda r: jnp.asarray(r * np.stack([np.cos(angle), np.sin(angle)], 1), jnp.float32)
  np.testing.assert_allclose(rewards.outer_ring(ring(2.0)), 1.0, rtol=1e-6)
  assert np.all(np.asarray(rewards.outer_ring(ring(1.0))) < 1e-5)
  assert np.all(np.asarray(rewards.outer_ring(ring(2.3))) < np.asarray(rewards.outer_ring(ring(2.1))))
  with pytest.raises(ValueError, match="reward must be one of"):
    rewards.get("pickscore")


def test_digit_reward_is_the_classifiers_log_probability_of_the_label():
  from core import data
  test = data.load_in_memory("digits", "test", config="r16").arrays
  x = test["image"][:64].astype(np.float32) / 127.5 - 1
  y = test["label"][:64]
  logp = np.asarray(rewards.digit_logprob(jnp.asarray(x), jnp.asarray(y)))
  assert logp.shape == (64,) and np.all(logp <= 0)
  assert np.mean(np.exp(logp) > 0.5) > 0.9                  # real digits: their own class is likely
  wrong = np.asarray(rewards.digit_logprob(jnp.asarray(x), jnp.asarray((y + 1) % 10)))
  assert wrong.mean() < logp.mean() - 3
  np.testing.assert_array_equal(rewards.digit_classifier()[0], rewards.digit_classifier.__wrapped__()[0])


# ---------------------------------------------------------------------------------------------
# The task through core.train


@pytest.fixture(scope="module")
def base_workdir(tmp_path_factory, smoke_runs):
  """A copy of the session's shared flow_2d.py:smoke run (trained once, through the CLI)."""
  return smoke_runs.copy("flow_2d_smoke", tmp_path_factory.mktemp("flowrl_base"))


def _config(base_workdir, sampler="precise", **grpo_fields):
  c = precise_2d.get_config(f"smoke,{sampler}")
  c.grpo.base_workdir = base_workdir
  c.grpo.update(grpo_fields)
  return c


def test_sharded_grpo_step_equals_the_single_device_step(base_workdir, seed):
  config = _config(base_workdir, "flow_grpo", window_size=3, ratio_norm=True)   # KL, window, RatioNorm
  config.optim.update({"name": "sgd", "b1": 0.9})
  batches = [{"y": np.zeros(8, np.int32)} for _ in range(2)]
  key = jax.random.PRNGKey(seed)
  results = []
  for mesh in (sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]),
               sharding.make_mesh({"data": 8, "fsdp": 1, "model": 1})):
    run = train.setup(config, mesh)
    state = run.init(key)
    for b in batches:
      state, metrics = run.step(state, sharding.global_batch(b, mesh))
    results.append((state, metrics))
  (s1, m1), (s8, m8) = results
  # loss and kl are ~0 (on-policy, -mean(A) over whole groups is 0 in exact arithmetic, and after one
  # small step kl ~ 1e-11): loss is float32 rounding (|loss| ~ 1e-6, measured), and the meshes sum its
  # ~100 terms (RMS <= 1) in other orders, which may differ by 2 log2(100) ulp: atol 16 ulp.
  for name in ("loss", "reward", "kl", "grad_norm"):
    np.testing.assert_allclose(float(m1[name]), float(m8[name]), rtol=1e-4, atol=16 * EPS32)
  assert float(m1["grad_norm"]) > 0
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  assert int(s8.carry["iteration"]) == 2


def test_a_sampled_batch_serves_updates_per_batch_steps(base_workdir, seed):
  """With 2 updates per batch: step 1 samples the buffer, step 2 reuses it unchanged (off-policy: its
  log-ratio is no longer 0), step 3 samples a new one."""
  config = _config(base_workdir, "precise", updates_per_batch=2)
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  run = train.setup(config, mesh)
  state = run.init(jax.random.PRNGKey(seed))
  buffers = []
  for i in range(3):
    state, _ = run.step(state, sharding.global_batch({"y": np.zeros(8, np.int32)}, mesh))
    buffers.append(jax.tree.map(np.asarray, state.carry["buffer"]))
  b1, b2, b3 = buffers
  assert b1["xs"].shape == (8, 2 * config.grpo.group_size, config.grpo.num_steps + 1, 2)
  for a, b in zip(jax.tree.leaves(b1), jax.tree.leaves(b2)):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(b1["xs"], b3["xs"])
  assert int(state.carry["iteration"]) == 3


@pytest.mark.slow
def test_smoke_run_logs_rewards_and_time_and_resumes(base_workdir, tmp_path):
  config = _config(base_workdir, "precise")
  assert train.train(config, str(tmp_path)) == config.train.num_steps
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  evals = [r for r in rows if "eval/reward_ode" in r]
  assert [r["step"] for r in evals] == [2, 4]
  assert all(np.isfinite(r[k]) for r in evals
             for k in ("eval/reward_ode", "eval/reward_sde", "eval/reward_ode_long"))
  assert 0 < evals[0]["train_seconds"] < evals[1]["train_seconds"]
  assert any("train/reward" in r for r in rows)
  # Per-update clip metrics: update 1 is on-policy (ratio 1: nothing clipped, every token with a
  # nonzero advantage carries gradient); the two updates' means average to the row's mean.
  for r in (r for r in rows if "train/clip_frac" in r):
    assert r["train/clip_frac_u1"] == 0 and 0 <= r["train/clip_frac_u2"] <= 1
    for name in ("clip_frac", "grad_frac"):
      np.testing.assert_allclose(r[f"train/{name}"], (r[f"train/{name}_u1"] + r[f"train/{name}_u2"]) / 2,
                                 atol=1e-6)
  config.train.num_steps = 6                                  # resume: the clock carries on
  train.train(config, str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  last = [r for r in rows if "eval/reward_ode" in r][-1]
  assert last["step"] == 6 and last["train_seconds"] > evals[1]["train_seconds"]


def test_lora_fine_tuning_keeps_the_base_frozen(base_workdir, tmp_path):
  config = _config(base_workdir, "dance", lora_rank=2, lora_alpha=4.0)
  train.train(config, str(tmp_path))
  params, _ = train.restore_params(str(tmp_path), ema=False)
  base, _ = train.restore_params(base_workdir)
  for a, b in zip(jax.tree.leaves(params["base"]), jax.tree.leaves(base)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(np.any(np.asarray(b) != 0) for b in jax.tree.leaves(params["lora"]))  # lora_b moved


def test_configs_select_sampler_and_recipe():
  """`<sampler>`: the matched recipe, where only the sampler and eta differ; `<sampler>_published`:
  each paper's own recipe."""
  trainer_fields = ("clip_range", "clip_ref_dim", "beta", "timestep_fraction", "same_noise", "ratio_norm")
  for module in (precise_2d, precise_digits):
    for preset in ("smoke", "cpu", "paper"):
      matched = {s: module.get_config(f"{preset},{s}").grpo for s in ("precise", "flow_grpo", "dance", "cps")}
      assert module.get_config(preset).grpo.sampler == "precise"
      assert {s: (g.sampler, g.recipe, g.eta) for s, g in matched.items()} == {
          "precise": ("precise", "matched", 1.5), "flow_grpo": ("flow_grpo", "matched", 0.7),
          "dance": ("dance", "matched", 0.3), "cps": ("cps", "matched", 0.7)}
      for g in matched.values():
        assert ([g[f] for f in trainer_fields] == [4e-6, 32 * 64 * 64, 0.0, 0.99, False, True]
                and g.to_dict() == {**matched["precise"].to_dict(), **{k: g[k] for k in (
                    "sampler", "eta", "sde_last_step")}})
      fg = module.get_config(f"{preset},flow_grpo_published").grpo
      assert (fg.recipe, fg.eta, fg.clip_range, fg.beta, fg.ratio_norm) == ("published", 0.7, 1e-4, 0.04, False)
      dance = module.get_config(f"{preset},dance_published").grpo
      assert (dance.eta, dance.same_noise, dance.timestep_fraction) == (0.3, True, 0.6)
      assert module.get_config(f"{preset},cps_published").grpo.eta == 0.8
      assert fg.num_steps == 10
  with pytest.raises(ValueError, match="unknown variant .ddpm.; valid variants: precise, flow_grpo"):
    precise_2d.get_config("smoke,ddpm")
  bad = precise_2d.get_config("smoke")
  bad.grpo.window_size = 10
  with pytest.raises(ValueError, match="window_size"):
    grpo_task.num_train_steps(bad)
  bad = precise_2d.get_config("smoke")
  bad.train.log_every = 3
  with pytest.raises(ValueError, match="log_every=3 must be a multiple of config.grpo.updates_per_batch=2"):
    grpo_task.check_config(bad)


def test_clip_range_scales_with_the_inverse_square_root_of_the_dimension_count(rng):
  """clip(D) = clip * sqrt(D_ref / D): the published clip at the published D, and the same multiple
  of a dimension-averaged log-ratio's spread (which falls as 1 / sqrt(D)) at any other D."""
  config = precise_2d.get_config("smoke")
  ref = config.grpo.clip_ref_dim
  assert grpo_task.effective_clip_range(config, (32, 64, 64)) == pytest.approx(4e-6)
  assert grpo_task.effective_clip_range(config, (2,)) == pytest.approx(4e-6 * np.sqrt(ref / 2))
  config.grpo.clip_ref_dim = 0
  assert grpo_task.effective_clip_range(config, (2,)) == 4e-6
  # The invariance it buys: the mean over D dims of z * dmu (z ~ N(0, 1)) spreads as dmu / sqrt(D),
  # so a clip at k * clip(D), k = dmu / (4e-6 sqrt(ref)), cuts it at one standard deviation for every D.
  config.grpo.clip_ref_dim = ref
  dmu = 0.01
  k = dmu / (4e-6 * np.sqrt(ref))
  for dim in (4, 64, 1024):
    clip = k * grpo_task.effective_clip_range(config, (dim,))
    outside = np.mean(np.abs((rng.standard_normal((20000, dim)) * dmu).mean(1)) > clip)
    assert abs(outside - 0.3173) < 0.02, (dim, outside)     # P(|N(0, 1)| > 1); 6 s.e. of 20000 draws


@pytest.mark.parametrize("method, eta", [("precise", 1.5), ("flow_grpo", 0.7)])
def test_ratio_norm_policy_loss_divides_each_step_by_its_mean_velocity_gain(rng, method, eta):
  """Precise's trainer: per step, ratio = exp(std (dlogp + mean |dmu|^2 / (2 std^2))), the batch's
  surrogate -A ratio (the clip far away), divided by |d mean / d v|; the steps' mean. float64."""
  theta0 = rng.standard_normal(3).astype(np.float32)
  theta1 = theta0 + rng.uniform(0.05, 0.2, 3).astype(np.float32) * rng.choice([-1, 1], 3)
  x_T = jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)
  grid = flow.time_grid(5, shift=3.0)
  adv = rng.standard_normal(8).astype(np.float32)
  steps = jnp.array([0, 2, 3])
  const = lambda theta: (lambda x, t: jnp.broadcast_to(jnp.asarray(theta), x.shape))
  traj = samplers.sample(const(theta0), x_T, grid, jax.random.key(int(rng.integers(1 << 30))),
                         method=method, eta=eta)
  value, _ = grpo.policy_loss(const(theta1), traj, jnp.asarray(adv), steps, method=method, eta=eta,
                              clip_range=10.0, use_ratio_norm=True)
  xs, g = np.asarray(traj.xs, np.float64), np.asarray(grid, np.float64)
  from tests.flowrl.test_samplers import reference_step
  per_step = []
  for k in np.asarray(steps):
    t, s = g[k], g[k + 1]
    (m_old, std), (m_new, _) = (reference_step(method, xs[k], np.broadcast_to(th, xs[k].shape), t, s,
                                               eta) for th in (theta0, theta1))
    logp = lambda m: (-0.5 * ((xs[k + 1] - m) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)).mean(1)
    normalised = std * (logp(m_new) - logp(m_old) + ((m_new - m_old) ** 2).mean(1) / (2 * std ** 2))
    gain = abs(reference_step(method, np.zeros((1, 3)), np.ones((1, 3)), t, s, eta)[0]
               - reference_step(method, np.zeros((1, 3)), np.zeros((1, 3)), t, s, eta)[0]).mean()
    per_step.append(np.mean(-adv * np.exp(normalised)) / gain)
  np.testing.assert_allclose(float(value), np.mean(per_step), rtol=1e-4,
                             atol=1e-5 * np.mean(np.abs(per_step)))


def test_sde_last_step_defaults_and_refusal():
  for sampler, noisy in (("flow_grpo", True), ("dance", True), ("cps", False), ("precise", False)):
    assert precise_2d.get_config(f"cpu,{sampler}").grpo.sde_last_step is noisy
  config = precise_2d.get_config("smoke,precise")
  config.grpo.sde_last_step = True
  with pytest.raises(ValueError, match="config.grpo.sde_last_step=True, but the step to t = 0 is "
                                       "deterministic for config.grpo.sampler='precise'"):
    grpo_task.check_config(config)
