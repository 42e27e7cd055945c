"""nn.Modules: projections, gates, short convolutions and norms around one op call."""

from ipl_layers.layers.conv import ShortConvolution
from ipl_layers.layers.delta_rule import DeltaNet, GatedDeltaNet
from ipl_layers.layers.lact import LaCT
from ipl_layers.layers.linear_attention import GatedLinearAttention, LinearAttention
from ipl_layers.layers.mamba2 import Mamba2
from ipl_layers.layers.memory_attention import MemoryAttention
from ipl_layers.layers.memory import MemoryPlus, ProductKeyMemory, memory_parameter_groups
from ipl_layers.layers.memory_finetune import (
    SlotCounts,
    SparseMemoryFinetuner,
    count_slot_accesses,
    mask_slot_gradients,
    memory_tables,
    select_slots,
    tfidf_slot_scores,
)
from ipl_layers.layers.memory_sharding import shard_memory_values, unshard_memory_values
from ipl_layers.layers.norm import GatedRMSNorm, RMSNorm
from ipl_layers.layers.titans import TitansMemory
from ipl_layers.layers.ttt_linear import TTTMLP, TTTLinear

__all__ = [
    "DeltaNet",
    "GatedDeltaNet",
    "GatedLinearAttention",
    "GatedRMSNorm",
    "LaCT",
    "LinearAttention",
    "Mamba2",
    "MemoryAttention",
    "MemoryPlus",
    "ProductKeyMemory",
    "RMSNorm",
    "ShortConvolution",
    "SlotCounts",
    "SparseMemoryFinetuner",
    "TTTLinear",
    "TitansMemory",
    "TTTMLP",
    "count_slot_accesses",
    "mask_slot_gradients",
    "memory_parameter_groups",
    "memory_tables",
    "select_slots",
    "shard_memory_values",
    "tfidf_slot_scores",
    "unshard_memory_values",
]
