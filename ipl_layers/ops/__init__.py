"""The public functional API: one module per op family (reference, torch chunked path, dispatch)."""

from ipl_layers.ops.delta_rule import delta_rule, delta_rule_reference
from ipl_layers.ops.lact import lact, lact_reference
from ipl_layers.ops.linear_attention import linear_attention, linear_attention_reference
from ipl_layers.ops.short_conv import short_conv, short_conv_reference
from ipl_layers.ops.ttt_linear import ttt_linear, ttt_linear_reference
from ipl_layers.ops.ttt_mlp import ttt_mlp, ttt_mlp_reference

__all__ = [
    "delta_rule",
    "delta_rule_reference",
    "lact",
    "lact_reference",
    "linear_attention",
    "linear_attention_reference",
    "short_conv",
    "short_conv_reference",
    "ttt_linear",
    "ttt_linear_reference",
    "ttt_mlp",
    "ttt_mlp_reference",
]
