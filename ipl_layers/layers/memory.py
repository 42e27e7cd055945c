"""Sparse key-value memory layers, drop-in replacements for a transformer block's feed-forward: a token's query
picks k of N = n^2 value rows per head by product-key search and reads their softmax-weighted sum
(`ipl_layers/ops/product_key.py`), so a table of millions of rows costs a few hundred row reads per token.

    ProductKeyMemory (Lample et al. 2019):  out = W_out bag(x)                 (W_out only when value_dim != hidden)
    MemoryPlus (Berges et al. 2024):        out = W_o (bag(x) * silu(W_g x))
    bag(x) = sum_h sum_k softmax(scores_h)_k values[slot_hk],   q_h = norm(W_q x)_h   [B, T, H, Dk]

The query norm is a LayerNorm per head by default. BatchNorm (the original paper's) is offered with a warning:
its statistics mix the tokens of a batch, so a token's output depends on later tokens (it breaks causality).
A value table can be shared by several layers by passing the same `nn.Parameter` as `values=` (explicit, no
hidden global); `memory_parameter_groups` gives the tables their own learning rate and no weight decay.
"""

import math
import warnings
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ipl_layers.ops import product_key_memory, product_key_topk

QUERY_NORMS = ("layernorm", "batchnorm", None)


class ProductKeyMemory(nn.Module):
    """Product-key memory (Lample et al. 2019); see the module docstring.

    Args:
        hidden_size: the block's width (input and output).
        num_heads: H query heads, each picking `topk` slots (all heads' reads are summed).
        num_keys: n sub-keys per half: N = n^2 value rows.
        topk: k slots per head (k <= n).
        key_dim: Dk, the query/key dim per head (even; default 256, half per sub-key set).
        value_dim: D of the value rows (default hidden_size; an output projection is added when different).
        query_norm: "layernorm" (default), "batchnorm" (warns: breaks causality) or None.
        values: an existing [n^2, value_dim] `nn.Parameter` to share with other layers (default: a new table,
            normal(0, value_dim^-0.5) as in the paper).
        sparse_grad: the table gets a sparse gradient of the rows touched (pair with a sparse optimizer).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int = 4,
        num_keys: int = 256,
        topk: int = 32,
        key_dim: int = 256,
        value_dim: Optional[int] = None,
        query_norm: Optional[str] = "layernorm",
        values: Optional[nn.Parameter] = None,
        sparse_grad: bool = False,
        backend: Optional[str] = None,
    ):
        super().__init__()
        name = type(self).__name__
        for arg, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("num_keys", num_keys),
                           ("topk", topk), ("key_dim", key_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {arg}: expected a positive int, got {value!r}")
        if key_dim % 2:
            raise ValueError(f"{name}: key_dim: expected an even dim (split into two sub-key halves), got {key_dim}")
        if topk > num_keys:
            raise ValueError(f"{name}: topk: expected at most num_keys = {num_keys}, got {topk}")
        if query_norm not in QUERY_NORMS:
            raise ValueError(f"{name}: query_norm: expected one of {QUERY_NORMS}, got {query_norm!r}")
        value_dim = value_dim or hidden_size
        H, Dk, N = num_heads, key_dim, num_keys * num_keys
        self.hidden_size, self.num_heads, self.num_keys, self.topk = hidden_size, H, num_keys, topk
        self.key_dim, self.value_dim, self.sparse_grad, self.backend = Dk, value_dim, sparse_grad, backend
        self.query_proj = nn.Linear(hidden_size, H * Dk, bias=False)
        if query_norm == "batchnorm":
            warnings.warn(f"{name}: query_norm='batchnorm' normalises with statistics over the batch and time, so "
                          "each output depends on other (later) tokens: it breaks causality in a language model",
                          stacklevel=2)
            self.query_norm = nn.BatchNorm1d(H * Dk)
        elif query_norm == "layernorm":
            self.query_norm = nn.LayerNorm(Dk)
        else:
            self.query_norm = None
        self.keys = nn.Parameter(torch.randn(H, 2, num_keys, Dk // 2) / math.sqrt(Dk // 2))  # sub-keys per head
        if values is None:
            values = nn.Parameter(torch.randn(N, value_dim) / math.sqrt(value_dim))
        elif not isinstance(values, nn.Parameter) or tuple(values.shape) != (N, value_dim):
            got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise ValueError(f"{name}: values: expected an nn.Parameter [num_keys^2, value_dim] = [{N}, {value_dim}] "
                             f"to share, got {got}")
        self.values = values
        self.values_group = None  # a process group once shard_memory_values has made `values` this rank's columns
        self.out_proj = nn.Linear(value_dim, hidden_size, bias=False) if value_dim != hidden_size else None

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, hidden] -> normalised queries [B, T, H, Dk]."""
        q = self.query_proj(x)
        if isinstance(self.query_norm, nn.BatchNorm1d):
            q = self.query_norm(q.flatten(0, -2)).view_as(q)
        q = q.unflatten(-1, (self.num_heads, self.key_dim))
        return self.query_norm(q) if isinstance(self.query_norm, nn.LayerNorm) else q

    def _check_hidden_states(self, x) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[-1] != self.hidden_size:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__}: hidden_states: expected [*, hidden_size = {self.hidden_size}], "
                             f"got {got}")

    def _read(self, x: torch.Tensor) -> torch.Tensor:
        self._check_hidden_states(x)
        return product_key_memory(self._query(x), self.keys, self.values, self.topk, sparse_grad=self.sparse_grad,
                                  backend=self.backend, values_group=self.values_group)  # [*, value_dim]

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        out = self._read(hidden_states)
        return out if self.out_proj is None else self.out_proj(out)

    @torch.no_grad()
    def slots(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The value rows a forward on `hidden_states` [*, hidden] reads: [*, H, k] int64 in [0, num_keys^2), as
        the forward selects them (same query, norm and search). For observing memory use, e.g. sparse fine-tuning
        (`ipl_layers/layers/memory_finetune.py`); a BatchNorm query norm in training mode updates its statistics."""
        self._check_hidden_states(hidden_states)
        return product_key_topk(self._query(hidden_states), self.keys, self.topk, backend=self.backend)[1]


class MemoryPlus(ProductKeyMemory):
    """Memory+ (Berges et al. 2024, "Memory Layers at Scale"): the product-key read gated by silu(W_g x), then
    W_o; see the module docstring (arguments as `ProductKeyMemory`)."""

    def __init__(self, hidden_size: int, *args, **kwargs):
        super().__init__(hidden_size, *args, **kwargs)
        self.gate_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.out_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.out_proj(self._read(hidden_states) * F.silu(self.gate_proj(hidden_states)))


def memory_parameter_groups(model: nn.Module, lr: float, values_lr: float,
                            weight_decay: float = 0.0) -> List[Dict[str, object]]:
    """Optimizer parameter groups: every memory layer's value table (shared tables once) with `values_lr` and
    no weight decay, as the papers train them; all other parameters with `lr` and `weight_decay`."""
    tables: Dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, ProductKeyMemory):
            tables[id(module.values)] = module.values
    rest: Iterable[nn.Parameter] = [p for p in model.parameters() if id(p) not in tables]
    return [{"params": list(rest), "lr": lr, "weight_decay": weight_decay},
            {"params": list(tables.values()), "lr": values_lr, "weight_decay": 0.0}]
