"""Triton kernels of the sparse-memory family: `embedding_bag`'s forward and its reverse-index backward."""

from ipl_layers.kernels.memory.embedding_bag_bwd import embedding_bag_bwd_values, embedding_bag_bwd_weights
from ipl_layers.kernels.memory.embedding_bag_fwd import embedding_bag_fwd

__all__ = ["embedding_bag_fwd", "embedding_bag_bwd_values", "embedding_bag_bwd_weights"]
