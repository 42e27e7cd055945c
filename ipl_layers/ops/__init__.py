"""The public functional API: one module per op family (reference, torch chunked path, dispatch)."""

from ipl_layers.ops.delta_rule import delta_rule, delta_rule_reference
from ipl_layers.ops.embedding_bag import embedding_bag, embedding_bag_reference
from ipl_layers.ops.lact import lact, lact_reference
from ipl_layers.ops.linear_attention import linear_attention, linear_attention_reference
from ipl_layers.ops.product_key import product_key_memory, product_key_topk, product_key_topk_reference
from ipl_layers.ops.sharded_embedding_bag import sharded_embedding_bag
from ipl_layers.ops.short_conv import short_conv, short_conv_reference
from ipl_layers.ops.titans_memory import titans_memory, titans_memory_reference
from ipl_layers.ops.ttt_linear import ttt_linear, ttt_linear_reference
from ipl_layers.ops.ttt_mlp import ttt_mlp, ttt_mlp_reference

__all__ = [
    "delta_rule",
    "delta_rule_reference",
    "embedding_bag",
    "embedding_bag_reference",
    "lact",
    "lact_reference",
    "linear_attention",
    "linear_attention_reference",
    "product_key_memory",
    "product_key_topk",
    "product_key_topk_reference",
    "sharded_embedding_bag",
    "short_conv",
    "short_conv_reference",
    "titans_memory",
    "titans_memory_reference",
    "ttt_linear",
    "ttt_linear_reference",
    "ttt_mlp",
    "ttt_mlp_reference",
]
