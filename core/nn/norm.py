"""The normalisation layers the transformer blocks choose between by name."""
from flax import linen as nn
from flax.typing import Dtype

NORMS = ("layer", "rms")


def make_norm(kind: str, *, affine: bool, dtype: Dtype, param_dtype: Dtype,
              name: str | None = None) -> nn.Module:
  """A LayerNorm or RMSNorm (eps 1e-6) over the last axis, to be called inside a compact method.

  Args:
    kind: "layer" or "rms".
    affine: learn a scale (and, for LayerNorm, a bias); adaLN blocks pass False because the
      modulation supplies both (DiT, arXiv 2212.09748 Sec. 3.2).
    dtype: compute dtype; reductions stay in float32 either way.
    param_dtype: dtype of the scale/bias.
    name: submodule name.
  """
  if kind == "layer":
    return nn.LayerNorm(epsilon=1e-6, use_scale=affine, use_bias=affine, dtype=dtype,
                        param_dtype=param_dtype, name=name)
  if kind == "rms":
    return nn.RMSNorm(epsilon=1e-6, use_scale=affine, dtype=dtype, param_dtype=param_dtype,
                      name=name)
  raise ValueError(f"norm kind must be one of {NORMS}, got {kind!r}")
