"""Layers and models shared by the methods: attention, embeddings, patches, MLPs, DiT, LoRA, convs."""
from core.nn.attention import IMPLS, MultiHeadAttention, dot_product_attention
from core.nn.conv import (Conv, Downsample, ResBlock, Upsample, group_norm, pixel_shuffle,
                          pixel_unshuffle, replicate_pad, upsample_nearest)
from core.nn.dit import AdaLN, DiT, DiTBlock, FinalLayer, modulate
from core.nn.embeddings import (ConditionEmbedder, LabelEmbedder, TimestepEmbedder, apply_rope,
                                rope_1d, rope_2d, sincos_2d, timestep_embedding)
from core.nn.flow_mlp import FlowMLP
from core.nn.gate import SigmaGate, gated_injection
from core.nn.lora import apply_with_lora, init_lora, merge, unmerge
from core.nn.mlp import MixFFN, Mlp, SwiGLU
from core.nn.norm import make_norm
from core.nn.patch import patchify, unpatchify
