"""`sharded_embedding_bag`: `embedding_bag` over a value table split by columns across the ranks of a process group.

The use it serves is data-parallel training (every rank reads the memory for its own tokens) with a value table
too large to replicate. Rank r holds the columns cols_r of the [N, D] table (every row, D_r of the D columns) and
the read runs in three steps (as Meta's "Memory Layers at Scale", Berges et al. 2024):

    1. all-gather every rank's (indices, weights)                     [M_s, n] each -> [M, n], M = sum_s M_s
    2. the local bag, for every rank's tokens, of the local columns   embedding_bag(...) -> [M, D_r]
    3. all-to-all: rank s gets the rows of its own tokens from every rank, concatenated along the columns
                                                                      -> [M_s, D] on rank s

and the backward mirrors it: the all-to-all in reverse gives each rank dout[:, cols_r] of every rank's tokens;
`embedding_bag`'s own backward then gives the local shard's gradient, already the full gradient of the sum of all
ranks' losses (no all-reduce: no other rank holds these columns), and each rank's partial weights' gradient
<dout[b, cols_r], values[idx[b, j], cols_r]>, which a second all-to-all returns to the rank owning the bag where
the W partials are summed in rank order (deterministic).

Why columns and not rows: with rows split, a bag's n rows lie on up to min(n, W) ranks, so each token sends its
(index, weight) pairs to their owners (data-dependent sizes: hot rows overload one rank) and gets back up to
min(n, W) partial bags of width D to sum; with columns split, every rank does the same work (each bag over D / W
columns), the message sizes depend only on the token counts, and each token receives exactly its D outputs. Per
token and rank, columns cost (W - 1) n (int32 index + weight) received in the all-gather plus (W - 1) / W * D
outputs through the all-to-all; rows cost n pairs plus up to min(n, W) * D partial outputs. For a memory layer
(n = H k = 4 * 32 = 128, D = 1024, fp32, W = 8): columns ~7 KB + ~3.5 KB, rows ~1 KB + ~32 KB. The all-gather
grows with W, so Meta shards within a node: pass a node's ranks as `group`.

Only plain collectives and `embedding_bag` are used: the two small autograd Functions below move data, and
`embedding_bag` keeps its backends, its deterministic backward and its sparse gradient for the shard (a DTensor
table would need sharding rules for our own autograd op and its sparse gradient, for no gain in what moves). Ranks may
hold different token counts (zero included) and different column counts (an uneven split of D); every rank of the
group must call the read, and run its backward, the same number of times in the same order, as with any
collective.
"""

import math
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from ipl_layers.ops.embedding_bag import _check_inputs, embedding_bag


def _require_group(group, op: str):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{op}: no default process group: call torch.distributed.init_process_group first "
                           "(the table is sharded across its ranks)")
    return group if group is not None else dist.group.WORLD


def _all_gather_rows(x: torch.Tensor, counts: Sequence[int], group) -> torch.Tensor:
    """Every rank's x [counts[s], *] concatenated in rank order -> [sum(counts), *]. gloo's all_gather needs equal
    sizes, so each rank sends its rows padded to the largest count."""
    padded = x.new_zeros(max(counts), *x.shape[1:])
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:c] for part, c in zip(parts, counts)])


def _all_to_all(send: List[torch.Tensor], recv_shapes: List[Sequence[int]], group) -> List[torch.Tensor]:
    """send[s] goes to rank s; the block from rank s comes back shaped recv_shapes[s]. One all_to_all_single over
    the flattened blocks (gloo's alltoallv: the blocks may differ in size and be empty)."""
    flat = torch.cat([block.reshape(-1) for block in send])
    sizes = [math.prod(shape) for shape in recv_shapes]
    out = flat.new_empty(sum(sizes))
    dist.all_to_all_single(out, flat, sizes, [block.numel() for block in send], group=group)
    return [block.view(shape) for block, shape in zip(out.split(sizes), recv_shapes)]


class ShardedBagGatherFunction(torch.autograd.Function):
    """Forward: every rank's weights [M_s, n] -> [M, n] (all-gather). Backward: the bag rows' partial gradients
    [M, n] go back to the ranks owning them (all-to-all) and are summed there in rank order."""

    @staticmethod
    def forward(ctx, w, counts, group):
        ctx.counts, ctx.group = counts, group
        return _all_gather_rows(w, counts, group)

    @staticmethod
    def backward(ctx, dw_all):
        mine, n = ctx.counts[dist.get_rank(ctx.group)], dw_all.shape[1]
        parts = _all_to_all(list(dw_all.split(ctx.counts)), [(mine, n)] * len(ctx.counts), ctx.group)
        return torch.stack(parts).sum(0), None, None  # [W, M_r, n] -> [M_r, n]


class ShardedBagAllToAllFunction(torch.autograd.Function):
    """Forward: the local columns of every rank's bags [M, D_r] -> this rank's bags over all columns [M_r, D].
    Backward: dout [M_r, D] -> dout of every rank's bags restricted to the local columns [M, D_r]."""

    @staticmethod
    def forward(ctx, part, counts, widths, group):
        ctx.counts, ctx.widths, ctx.group = counts, widths, group
        mine = counts[dist.get_rank(group)]
        blocks = _all_to_all(list(part.split(counts)), [(mine, d) for d in widths], group)
        return torch.cat(blocks, dim=1)

    @staticmethod
    def backward(ctx, dout):
        width = ctx.widths[dist.get_rank(ctx.group)]
        send = [block.contiguous() for block in dout.split(ctx.widths, dim=1)]
        blocks = _all_to_all(send, [(c, width) for c in ctx.counts], ctx.group)
        return torch.cat(blocks), None, None, None


def sharded_embedding_bag(
    indices: torch.Tensor,
    weights: torch.Tensor,
    values_shard: torch.Tensor,
    *,
    group: Optional["dist.ProcessGroup"] = None,
    sparse_grad: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """out[b] = sum_j weights[b, j] * values[indices[b, j]] for this rank's bags, the table split by columns
    across the ranks of `group` (module docstring).

    Args:
        indices: [*, n] int32/int64 rows of the table, each in [0, N); this rank's bags (any count, zero too).
        weights: [*, n] their weights; differentiable (the gradient sums every rank's partial).
        values_shard: [N, D_r] this rank's columns of the [N, D] table (the ranks' shards, in rank order, are the
            table's columns left to right); differentiable: its gradient is that of the sum of all ranks' losses.
        group: the process group the table is sharded over (default: the default group).
        sparse_grad, backend: as `embedding_bag` (the local bag's).

    Returns:
        [*, D] in the dtype of values_shard. Every rank must pass the same n, N, weights' dtype and table dtype.
    """
    group = _require_group(group, "sharded_embedding_bag")
    _check_inputs(indices, weights, values_shard)
    M, n = math.prod(indices.shape[:-1]), indices.shape[-1]  # bags, rows per bag
    N, width = values_shard.shape
    # one small exchange tells every rank every other's bag count and column count, and checks n and N agree
    mine = torch.tensor([M, width, n, N], dtype=torch.int64, device=values_shard.device)
    sizes = _all_gather_rows(mine[None], [1] * dist.get_world_size(group), group)  # [W, 4]
    for col, name in ((2, "rows per bag n (indices.shape[-1])"), (3, "table rows N (values_shard.shape[0])")):
        if (sizes[:, col] != sizes[0, col]).any():
            raise ValueError(f"sharded_embedding_bag: every rank must pass the same {name}, got "
                             f"{sizes[:, col].tolist()} by rank")
    counts, widths = sizes[:, 0].tolist(), sizes[:, 1].tolist()
    idx = indices.reshape(M, n).to(torch.int32 if N < 2**31 else torch.int64)  # int32 halves the gathered bytes
    idx_all = _all_gather_rows(idx, counts, group)  # [M_all, n]
    w_all = ShardedBagGatherFunction.apply(weights.reshape(M, n), counts, group)  # [M_all, n]
    part = embedding_bag(idx_all, w_all, values_shard, sparse_grad=sparse_grad, backend=backend)  # [M_all, D_r]
    out = ShardedBagAllToAllFunction.apply(part, counts, widths, group)  # [M, D]
    return out.reshape(*indices.shape[:-1], sum(widths))
