"""Reusable building blocks shared by every vitkit model family."""

from vitkit.layers.attention import Attention, MultiQueryAttention, fused_attn, use_fused_attn
from vitkit.layers.block import Block
from vitkit.layers.conv_bn import ClassifierHead, ConvNormAct, fuse_conv_bn, make_divisible
from vitkit.layers.drop import DropPath, drop_path_schedule
from vitkit.layers.halo_attention import HaloAttention, PosEmbedRel
from vitkit.layers.helpers import to_2tuple
from vitkit.layers.mlp import Mlp
from vitkit.layers.norm import GroupNormAct, LayerNorm2d
from vitkit.layers.padding import Conv2dSame, MaxPool2dSame, get_same_padding, pad_same
from vitkit.layers.patch_embed import PatchEmbed
from vitkit.layers.pos_embed import resample_abs_pos_embed
from vitkit.layers.std_conv import StdConv2d, StdConv2dSame

__all__ = [
    "Attention",
    "Block",
    "ClassifierHead",
    "ConvNormAct",
    "fuse_conv_bn",
    "Conv2dSame",
    "DropPath",
    "GroupNormAct",
    "HaloAttention",
    "LayerNorm2d",
    "MaxPool2dSame",
    "MultiQueryAttention",
    "Mlp",
    "PatchEmbed",
    "PosEmbedRel",
    "StdConv2d",
    "StdConv2dSame",
    "drop_path_schedule",
    "fused_attn",
    "get_same_padding",
    "make_divisible",
    "pad_same",
    "resample_abs_pos_embed",
    "to_2tuple",
    "use_fused_attn",
]
