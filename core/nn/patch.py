"""Image <-> token sequence: non-overlapping p x p patches in row-major order."""
import einops
import jax


def patchify(x_BxHxWxC: jax.Array, p: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C].

  Tokens run over the patch grid row by row; each flattens its patch in (row, column, channel)
  order, so a Dense on the tokens is a stride-p convolution with a p x p kernel.
  """
  if x_BxHxWxC.ndim != 4:
    raise ValueError(f"patchify needs x of shape [B, H, W, C], got {x_BxHxWxC.shape}")
  _, h, w, _ = x_BxHxWxC.shape
  if h % p or w % p:
    raise ValueError(f"patchify: height {h} and width {w} of x {x_BxHxWxC.shape} must both be "
                     f"divisible by the patch size {p}")
  return einops.rearrange(x_BxHxWxC, "b (h p) (w q) c -> b (h w) (p q c)", p=p, q=p)


def unpatchify(tokens_BxNxP: jax.Array, p: int, height: int, width: int,
               channels: int) -> jax.Array:
  """The inverse of `patchify`: [B, N, p*p*channels] -> [B, height, width, channels].

  height, width and channels are the image's (in pixels), not the token grid's; N must be
  (height/p) * (width/p).
  """
  if height % p or width % p:
    raise ValueError(f"unpatchify: height {height} and width {width} must both be divisible by "
                     f"the patch size {p}")
  expected = ((height // p) * (width // p), p * p * channels)
  if tokens_BxNxP.ndim != 3 or tokens_BxNxP.shape[1:] != expected:
    raise ValueError(f"unpatchify: tokens must be [B, N, P] = [B, {expected[0]}, {expected[1]}] "
                     f"for a {height}x{width}x{channels} image with patch size {p}, "
                     f"got {tokens_BxNxP.shape}")
  return einops.rearrange(tokens_BxNxP, "b (h w) (p q c) -> b (h p) (w q) c",
                          h=height // p, p=p, q=p, c=channels)
