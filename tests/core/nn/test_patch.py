import jax.numpy as jnp
import numpy as np
import pytest

from core.nn.patch import patchify, unpatchify


@pytest.mark.parametrize("shape,p", [((2, 8, 4, 3), 2), ((1, 6, 9, 2), 3), ((2, 4, 4, 5), 1)])
def test_patchify_matches_loop_and_round_trips(rng, shape, p):
  x = rng.normal(size=shape).astype(np.float32)
  b, h, w, c = shape
  tokens = np.asarray(patchify(jnp.asarray(x), p))
  assert tokens.shape == (b, (h // p) * (w // p), p * p * c)
  expected = np.zeros_like(tokens)
  for i in range(h // p):
    for j in range(w // p):
      for u in range(p):
        for v in range(p):
          token, feature = i * (w // p) + j, (u * p + v) * c
          expected[:, token, feature:feature + c] = x[:, i * p + u, j * p + v]
  np.testing.assert_array_equal(tokens, expected)
  np.testing.assert_array_equal(unpatchify(jnp.asarray(tokens), p, h, w, c), x)


def test_errors_name_the_shapes(rng):
  x = jnp.asarray(rng.normal(size=(1, 6, 8, 3)))
  with pytest.raises(ValueError, match="height 6 and width 8.*divisible by the patch size 4"):
    patchify(x, 4)
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    patchify(x[0], 2)
  with pytest.raises(ValueError, match=r"must be \[B, N, P\] = \[B, 12, 16\] .*got \(1, 12, 12\)"):
    unpatchify(patchify(x, 2), 2, 6, 8, 4)
