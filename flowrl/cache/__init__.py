"""Training-free acceleration of rectified-flow sampling: VDE (arXiv 2605.23381) and caching baselines.

  from flowrl.cache import sampling
  x0, nfe_B = sampling.sample(model, params, x_T, 50, sampling.vde(6, 3), y=y, cfg_scale=2.0)

`vde`: VDE's velocity decomposition and fixed schedule. `sampling`: the sampler and its policies
(full, fewer_steps, vde, vde_adaptive, vde_residual, vde_budget, teacache, easycache, fora).
`calibrate`: fits TeaCache's rescaling polynomial to a trained model (constrained non-negative and
monotone by default, with its R^2). `testbed`: a Gaussian-smoothed empirical distribution whose exact
velocity (and exact CFG) every policy runs on, for fast regression tests.
"""
