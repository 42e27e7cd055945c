"""nn.Modules: projections, gates, short convolutions and norms around one op call."""

from ipl_layers.layers.conv import ShortConvolution
from ipl_layers.layers.delta_rule import DeltaNet, GatedDeltaNet
from ipl_layers.layers.lact import LaCT
from ipl_layers.layers.linear_attention import GatedLinearAttention, LinearAttention
from ipl_layers.layers.norm import GatedRMSNorm, RMSNorm
from ipl_layers.layers.ttt_linear import TTTMLP, TTTLinear

__all__ = [
    "DeltaNet",
    "GatedDeltaNet",
    "GatedLinearAttention",
    "GatedRMSNorm",
    "LaCT",
    "LinearAttention",
    "RMSNorm",
    "ShortConvolution",
    "TTTLinear",
    "TTTMLP",
]
