"""Sparse memory fine-tuning (Lin et al. 2025, "Continual Learning via Sparse Memory Finetuning"): write new facts
into the value tables of memory layers by training only the few rows the new data reads far more than a background
sample does. Knowledge spread over the other rows and every other weight stays as it was, so there is little
forgetting.

    c_i   = reads of slot i by the new data (every token, head and top-k pick; all layers sharing the table)
    df_i  = background documents (batches) that read slot i at least once, out of |B|
    score_i = c_i / sum_j c_j * log(|B| / (1 + df_i))        TF-IDF; -inf for slots the new data never reads

Per value table the top-t slots by score are trained (Lin et al. re-select them for every training batch against
a fixed background sample; selecting once for all the new data works the same way). `count_slot_accesses`,
`tfidf_slot_scores`, `select_slots` and `mask_slot_gradients` are the steps; `SparseMemoryFinetuner` ties them to
an optimizer.
"""

import math
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ipl_layers.layers.memory import ProductKeyMemory


class SlotCounts(NamedTuple):
    """Reads of one value table's N slots over a set of documents."""

    counts: torch.Tensor  # [N] int64: total reads (tokens x heads x top-k picks)
    doc_freq: torch.Tensor  # [N] int64: documents reading the slot at least once
    num_docs: int


def memory_tables(model: nn.Module) -> Dict[str, List[ProductKeyMemory]]:
    """Every value table of the model's memory layers, by its parameter name (a table shared by several layers
    appears once, under the name `model.named_parameters()` gives it), with the layers reading it."""
    names = {id(p): name for name, p in model.named_parameters()}
    tables: Dict[str, List[ProductKeyMemory]] = {}
    for module in model.modules():
        if isinstance(module, ProductKeyMemory):
            tables.setdefault(names[id(module.values)], []).append(module)
    if not tables:
        raise ValueError(f"model: expected a module containing ProductKeyMemory/MemoryPlus layers, "
                         f"got {type(model).__name__} with none")
    return tables


@torch.no_grad()
def count_slot_accesses(model: nn.Module, batches: Iterable,
                        forward: Optional[Callable] = None) -> Dict[str, SlotCounts]:
    """Runs `forward(batch)` (default `model(batch)`) on each batch without gradients and counts which value
    rows the memory layers read. Each batch is one document for the document frequency (pass single sequences
    for per-sequence frequencies). Padded tokens are counted like the others. Each memory layer's query and
    search run twice per batch (`ProductKeyMemory.slots` beside the forward's read); forwards outside the count
    are untouched.

    Returns:
        {table name: SlotCounts}, one entry per distinct value table (see `memory_tables`).
    """
    tables = memory_tables(model)
    forward = model if forward is None else forward
    device = {name: layers[0].values.device for name, layers in tables.items()}
    size = {name: layers[0].values.shape[0] for name, layers in tables.items()}
    counts = {name: torch.zeros(size[name], dtype=torch.int64, device=device[name]) for name in tables}
    doc_freq = {name: torch.zeros_like(counts[name]) for name in tables}
    batch_counts: Dict[str, torch.Tensor] = {}

    def recorder(name: str):
        def hook(layer, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            batch_counts[name] += torch.bincount(layer.slots(x).flatten(), minlength=size[name])  # [N]
        return hook

    # A pre-hook observes the layer's input only while counting: the forward itself is unchanged.
    handles = [layer.register_forward_pre_hook(recorder(name), with_kwargs=True)
               for name, layers in tables.items() for layer in layers]
    num_docs = 0
    try:
        for batch in batches:
            batch_counts.update({name: torch.zeros_like(c) for name, c in counts.items()})
            forward(batch)
            for name, c in batch_counts.items():
                counts[name] += c
                doc_freq[name] += c > 0
            num_docs += 1
    finally:
        for handle in handles:
            handle.remove()
    return {name: SlotCounts(counts[name], doc_freq[name], num_docs) for name in tables}


def _check_vector(name: str, x, n: Optional[int] = None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 1 or (n is not None and x.shape[0] != n):
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a 1-D tensor [{'N' if n is None else f'N = {n}'}], got {got}")


def tfidf_slot_scores(new_counts: torch.Tensor, background_doc_freq: torch.Tensor,
                      num_background_docs: int) -> torch.Tensor:
    """TF-IDF of each slot (module docstring): high for slots the new data reads often and few background documents
    read. new_counts, background_doc_freq: [N] non-negative counts. Returns [N] float64, -inf where new_counts
    is 0 (a slot the new data never reads gets no gradient from it, so training it is pointless)."""
    _check_vector("new_counts", new_counts)
    N = new_counts.shape[0]
    _check_vector("background_doc_freq", background_doc_freq, N)
    if not isinstance(num_background_docs, int) or num_background_docs < 1:
        raise ValueError(f"num_background_docs: expected a positive int, got {num_background_docs!r}")
    if bool((new_counts < 0).any()) or bool((background_doc_freq < 0).any()):
        raise ValueError("new_counts, background_doc_freq: expected non-negative counts, got negative entries")
    if int(background_doc_freq.max()) > num_background_docs:
        raise ValueError(f"background_doc_freq: expected at most num_background_docs = {num_background_docs}, "
                         f"got {int(background_doc_freq.max())}")
    counts = new_counts.double()
    tf = counts / counts.sum().clamp_min(1)
    idf = math.log(num_background_docs) - torch.log1p(background_doc_freq.double())
    return (tf * idf).masked_fill(counts == 0, -math.inf)


def select_slots(scores: torch.Tensor, top_t: int) -> torch.Tensor:
    """The `top_t` slots of highest score ([N] scores; ties go to the lower slot), dropping -inf scores (slots not
    to train), as an ascending int64 tensor of at most top_t slots."""
    _check_vector("scores", scores)
    N = scores.shape[0]
    if not isinstance(top_t, int) or not 1 <= top_t <= N:
        raise ValueError(f"top_t: expected an int in [1, N = {N}] (N value rows), got {top_t!r}")
    best = torch.sort(scores, descending=True, stable=True).indices[:top_t]
    return best[scores[best] > -math.inf].sort().values


def mask_slot_gradients(table: nn.Parameter, slots: torch.Tensor) -> RemovableHandle:
    """Zeroes the gradient of every row of `table` [N, D] but `slots` as it reaches the table, dense (other rows
    0) or sparse COO (other rows dropped), for every layer reading the table. Remove with `handle.remove()`.

    A mask alone does not keep rows fixed: weight decay and momentum move rows whose gradient is 0. Pair it with
    plain SGD, or use `SparseMemoryFinetuner`, whose lazy Adam touches only the rows in the gradient."""
    if not isinstance(table, nn.Parameter) or table.dim() != 2:
        got = list(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        raise ValueError(f"table: expected an nn.Parameter [N, D], got {got}")
    N = table.shape[0]
    _check_vector("slots", slots)
    if slots.dtype != torch.int64 or (slots.numel() and not (0 <= int(slots.min()) and int(slots.max()) < N)):
        raise ValueError(f"slots: expected int64 rows in [0, N = {N}), got {slots.dtype} {slots.tolist()[:8]}")
    keep = torch.zeros(N, dtype=torch.bool, device=table.device)
    keep[slots] = True

    def hook(grad: torch.Tensor) -> torch.Tensor:
        if grad.is_sparse:
            grad = grad.coalesce()
            kept = keep[grad.indices()[0]]  # [nnz]
            return torch.sparse_coo_tensor(grad.indices()[:, kept], grad.values()[kept], grad.shape,
                                           is_coalesced=True, check_invariants=False)
        return grad.masked_fill(~keep[:, None], 0)

    return table.register_hook(hook)


class SparseMemoryFinetuner:
    """Trains only the top-t TF-IDF slots of each value table of `model` (module docstring):

        finetuner = SparseMemoryFinetuner(model, count_slot_accesses(model, background_batches), top_t=64)
        finetuner.select(new_batches)      # rank the slots; re-select per batch or once for the whole new data
        loss_fn(model(x)).backward()
        finetuner.step()                   # update the selected rows, clear the gradients

    Every parameter but the value tables is frozen while the finetuner is active (`remove()` restores the flags
    and drops the gradient masks), so nothing else can move and backward skips their gradients.

    The optimizer is `torch.optim.SparseAdam` over the tables, fed a sparse gradient of the selected rows (dense
    gradients are gathered into one): lazy Adam updates a row and its moments only when the row is in the
    gradient, so a row outside the current selection stays bit for bit as it was. Dense Adam/AdamW would not: its
    momentum keeps moving rows selected at earlier steps, and weight decay shrinks every row (the memory papers
    train value tables without weight decay).

    Args:
        model: a module containing ProductKeyMemory/MemoryPlus layers.
        background: `count_slot_accesses(model, background_batches)`, the slot document frequencies of data whose
            knowledge should be kept (e.g. a pre-training sample).
        top_t: rows trained per value table (at most its N).
        lr, betas, eps: SparseAdam's.
        forward: runs one batch for `select` (default `model(batch)`).
    """

    def __init__(self, model: nn.Module, background: Dict[str, SlotCounts], top_t: int, lr: float = 1e-3,
                 betas=(0.9, 0.999), eps: float = 1e-8, forward: Optional[Callable] = None):
        self.model, self.top_t, self.forward = model, top_t, forward
        self.tables = {name: layers[0].values for name, layers in memory_tables(model).items()}
        if not isinstance(background, dict) or sorted(background) != sorted(self.tables):
            got = sorted(background) if isinstance(background, dict) else type(background).__name__
            raise ValueError(f"background: expected count_slot_accesses(model, ...) with the value tables "
                             f"{sorted(self.tables)}, got {got}")
        for name, table in self.tables.items():
            _check_vector(f"background[{name!r}].doc_freq", background[name].doc_freq, table.shape[0])
            if not isinstance(top_t, int) or not 1 <= top_t <= table.shape[0]:
                raise ValueError(f"top_t: expected an int in [1, N = {table.shape[0]}] (rows of {name}), got {top_t!r}")
        self.background = background
        self._requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        table_ids = {id(t) for t in self.tables.values()}
        for p, _ in self._requires_grad:
            p.requires_grad_(id(p) in table_ids)
        for table in self.tables.values():
            table.grad = None  # a gradient left from earlier training is no fine-tuning gradient
        self.optimizer = torch.optim.SparseAdam(list(self.tables.values()), lr=lr, betas=betas, eps=eps)
        self.selected: Dict[str, torch.Tensor] = {}
        self._handles: List[RemovableHandle] = []

    def select(self, new_batches: Iterable) -> Dict[str, torch.Tensor]:
        """Counts the slots `new_batches` read, ranks them by TF-IDF against the background and masks every
        table's gradient to its top-t slots. Returns {table name: ascending slots}; call before backward."""
        pending = [name for name, table in self.tables.items() if table.grad is not None]
        if pending:  # masked to another selection or to none: step() would apply rows outside this one
            raise RuntimeError(f"SparseMemoryFinetuner.select: the tables {pending} hold gradients from before this "
                               "selection; call step() before selecting again")
        counts = count_slot_accesses(self.model, new_batches, self.forward)
        self.selected = {name: select_slots(tfidf_slot_scores(c.counts, self.background[name].doc_freq,
                                                              self.background[name].num_docs), self.top_t)
                         for name, c in counts.items()}
        for handle in self._handles:
            handle.remove()
        self._handles = [mask_slot_gradients(self.tables[name], slots) for name, slots in self.selected.items()]
        return self.selected

    def step(self) -> None:
        """One SparseAdam step on the selected rows, then the tables' gradients are cleared."""
        if not self.selected:
            raise RuntimeError("SparseMemoryFinetuner.step: no slots selected; call select(new_batches) first")
        for name, table in self.tables.items():
            if table.grad is not None and not table.grad.is_sparse:
                rows = self.selected[name]  # [t] ascending, distinct: a coalesced sparse gradient
                table.grad = torch.sparse_coo_tensor(rows[None], table.grad.index_select(0, rows), table.shape,
                                                     is_coalesced=True, check_invariants=False)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def remove(self) -> None:
        """Drops the gradient masks and restores every parameter's requires_grad."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)
