"""Memory layers with their value tables split by columns across ranks (`ipl_layers/ops/sharded_embedding_bag.py`
holds the read and argues the design).

`shard_memory_values(model)` keeps, in every `ProductKeyMemory` / `MemoryPlus` of the model, only this rank's
columns of the value table (a table shared by several layers is sharded once and stays shared) and routes the
layers' reads through `sharded_embedding_bag`; the rest of the model stays replicated. `unshard_memory_values`
gathers the full tables back, for a checkpoint or single-process use. Columns are split as `torch.tensor_split`
splits them: the first D % W ranks hold one column more.

Two things make data-parallel training with DDP give the unsharded model's gradients:
- DDP must not all-reduce the shards (each rank holds different columns): `shard_memory_values` adds them to the
  model's DDP ignore list, so shard before wrapping the model in `DistributedDataParallel`.
- The read's gradient for a shard is that of the sum of all ranks' losses, while DDP averages the replicated
  parameters' gradients (the gradient of the mean loss): with `average_grad=True` (default) a gradient hook on
  each shard divides by W, so every parameter gets the gradient of the mean.

A sharded layer holds its process group, so the model cannot be deep-copied or pickled whole (nor can a DDP
module). Its `state_dict` holds this rank's shards; for a checkpoint of full tables, unshard first; to resume from
one, load it into the unsharded model, then shard.
"""

from typing import Dict, List, Set

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ipl_layers.layers.memory import ProductKeyMemory
from ipl_layers.ops.sharded_embedding_bag import _all_gather_rows, _require_group


def shard_columns(dim: int, world_size: int, rank: int) -> slice:
    """The columns of a width-`dim` table that `rank` of `world_size` holds (as `torch.tensor_split`)."""
    base, extra = divmod(dim, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def _names(model: nn.Module, ids: Set[int]) -> Set[str]:
    """Every name under which the model holds one of the parameters of these ids (a shared table has several).
    A parameter of the root module itself is named twice, "values" and ".values": DDP matches both spellings."""
    names = {name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in ids}
    return names | {f".{name}" for name in names if "." not in name}


def _set_ddp_ignored(model: nn.Module, names: Set[str], ignore: bool):
    """Adds (or removes) the names in the model's DDP ignore list (DDP's own hook for parameters it must not
    all-reduce; read when DDP wraps the model)."""
    kept = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ())) - names
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(kept | names if ignore else kept))


def shard_memory_values(model: nn.Module, group=None, average_grad: bool = True) -> nn.Module:
    """Makes every memory layer's value table [N, D] this rank's columns [N, D_r] of it, in place (module
    docstring). The full tables must be equal on every rank (same seed, or one checkpoint). Build the optimizer
    (and DDP) after this call: the shards are new parameters.

    Args:
        model: a module holding `ProductKeyMemory` / `MemoryPlus` layers (or one such layer).
        group: the process group to shard over (default: the default group); every rank of it calls this.
        average_grad: divide the shards' gradients by the group size, to match DDP's averaging (module
            docstring); False keeps the gradient of the sum of the ranks' losses.
    Returns:
        model.
    """
    group = _require_group(group, "shard_memory_values")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    layers = [m for m in model.modules() if isinstance(m, ProductKeyMemory)]
    if not layers:
        raise ValueError(f"shard_memory_values: no ProductKeyMemory / MemoryPlus layer in {type(model).__name__}")
    for layer in layers:  # every check before any change
        if layer.values_group is not None:
            raise ValueError(f"shard_memory_values: {type(layer).__name__}'s value table is already sharded")
        if layer.value_dim < world:
            raise ValueError(f"shard_memory_values: a value table of D = {layer.value_dim} columns cannot give each "
                             f"of {world} ranks at least one")
    shards: Dict[int, nn.Parameter] = {}  # id(full table) -> its shard: a shared table is sharded once
    for layer in layers:
        table = layer.values
        if id(table) not in shards:
            cols = shard_columns(layer.value_dim, world, rank)
            shard = nn.Parameter(table.detach()[:, cols].clone(), requires_grad=table.requires_grad)
            if average_grad and shard.requires_grad:
                shard.register_hook(lambda grad: grad / world)  # sparse gradients divide too
            shards[id(table)] = shard
        layer.values, layer.values_group = shards[id(table)], group
    _set_ddp_ignored(model, _names(model, {id(p) for p in shards.values()}), ignore=True)
    return model


def unshard_memory_values(model: nn.Module) -> nn.Module:
    """The way back: every sharded table gathered whole ([N, D], a new parameter) on every rank, the reads local
    again, in place; every rank of each table's group calls this. Returns model."""
    tables: Dict[int, nn.Parameter] = {}  # id(shard) -> the full table
    sharded = _names(model, {id(m.values) for m in model.modules()
                             if isinstance(m, ProductKeyMemory) and m.values_group is not None})
    for module in model.modules():
        if not isinstance(module, ProductKeyMemory) or module.values_group is None:
            continue
        shard, group = module.values, module.values_group
        if id(shard) not in tables:
            world, D = dist.get_world_size(group), module.value_dim
            widths: List[int] = [shard_columns(D, world, r).stop - shard_columns(D, world, r).start
                                 for r in range(world)]
            columns = _all_gather_rows(shard.detach().t(), widths, group)  # [D, N]: gathered along the columns
            tables[id(shard)] = nn.Parameter(columns.t().contiguous(), requires_grad=shard.requires_grad)
        module.values, module.values_group = tables[id(shard)], None
    _set_ddp_ignored(model, sharded, ignore=False)
    return model
