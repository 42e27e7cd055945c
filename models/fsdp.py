"""FSDP2 (`fully_shard`) for ipl-train: each decoder block and then the whole model are sharded across the ranks,
and checkpoints stay the files a single process writes: the full (unsharded) weights and optimizer state are
gathered for saving and scattered back on resume. The optimizer state is keyed by parameter name (FSDP's layout),
so a run resumes under the same `parallel` setting (train.py checks it)."""

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

from ipl_layers.layers.memory import ProductKeyMemory

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered whole, on the CPU


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """Shards an `IPLForCausalLM` in place: one FSDP unit per block (its parameters gathered only around it), the
    embeddings, final norm and head in the root unit. Sparse value gradients cannot be reduce-scattered."""
    sparse = [name for name, m in model.named_modules() if isinstance(m, ProductKeyMemory) and m.sparse_grad]
    if sparse:
        raise ValueError(f"parallel: 'fsdp' needs dense gradients, but memory layers {sparse} have sparse_grad=True "
                         "(use parallel='ddp', or sparse_grad=False)")
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def full_model_state(model: torch.nn.Module) -> dict:
    """The whole model's weights on every rank (a collective: every rank calls it)."""
    return get_model_state_dict(model, options=FULL)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The whole optimizer state, keyed by parameter name (a collective)."""
    return get_optimizer_state_dict(model, optimizer, options=FULL)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict):
    """Scatters a full optimizer state (`full_optimizer_state`'s) into the sharded optimizer."""
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))
