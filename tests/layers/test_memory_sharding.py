"""Value tables split by columns across ranks (ipl_layers/ops/sharded_embedding_bag.py, layers/memory_sharding.py):
two processes on the gloo backend, each with its own tokens (different counts, none on one rank in two cases),
against the unsharded op or layer run in float64 over every rank's tokens.

What "the same gradients" means here: rank r's shard gradient must be columns cols_r of the unsharded table's
gradient of the summed loss (sum over ranks of each rank's loss), the weights' and inputs' gradients those of the
unsharded run on that rank's tokens, and the replicated parameters' gradients, summed over ranks, the unsharded
ones (with DDP and average_grad=True every gradient is the unsharded one divided by the world size).

All two-rank cases run in one spawn (a module fixture); each case is its own test, reporting every rank's error.
"""

import copy
import datetime
import itertools
import json
import math
import traceback
from typing import List

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_rel_rms
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ipl_layers.layers import MemoryPlus, ProductKeyMemory, shard_memory_values, unshard_memory_values
from ipl_layers.layers.memory_sharding import shard_columns
from ipl_layers.ops import embedding_bag, embedding_bag_reference, sharded_embedding_bag

WORLD = 2
HIDDEN = 12
# Relative RMS error against the float64 unsharded run. fp32: measured < 6e-7 on outputs and gradients, 1.2e-6 on
# an SGD update. float64: the sharded algorithm is exact up to summation order (measured 3e-17). Besides, the fp32
# outputs and shard gradients are bit-exact against the unsharded fp32 op (check_op).
BOUNDS = {torch.float32: 1e-5, torch.float64: 1e-12}
CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def gather_columns(shard: torch.Tensor, dim: int) -> torch.Tensor:
    """Every rank's [N, D_r] (column shards in rank order) -> the [N, D] table, on every rank."""
    widths = [len(range(dim)[shard_columns(dim, WORLD, r)]) for r in range(WORLD)]
    padded = shard.new_zeros(shard.shape[0], max(widths))
    padded[:, :shard.shape[1]] = shard
    parts = [torch.empty_like(padded) for _ in widths]
    dist.all_gather(parts, padded)
    return torch.cat([part[:, :w] for part, w in zip(parts, widths)], dim=1)


def float64_copy(model: nn.Module) -> nn.Module:
    """The unsharded reference: a float64 copy with dense table gradients."""
    ref = copy.deepcopy(model).double()
    for module in ref.modules():
        if isinstance(module, ProductKeyMemory):
            module.sparse_grad = False
    return ref


def check_op(rank, leading, dtype=torch.float32, sparse_grad=False, backend=None, N=20, D=7, n=5) -> List[str]:
    """The op on each rank's bags of shape [*leading[rank], n] (D = 7: columns split 4 / 3) against the reference bag
    in float64 over every rank's bags, for the loss sum_r <out_r, g_r>. Returns the failure, if any, instead of
    raising it: a rank that stopped early would leave the other waiting in (or mismatching) a collective."""
    counts = [math.prod(shape) for shape in leading]
    idx, w = torch.randint(0, N, (sum(counts), n)), torch.randn(sum(counts), n)  # every rank's bags, in rank order
    table, g = torch.randn(N, D), torch.randn(sum(counts), D)
    w_ref, table_ref = w.double().requires_grad_(), table.double().requires_grad_()
    ref = embedding_bag_reference(idx, w_ref, table_ref)  # the ground truth, bag by bag
    dw_ref, dtable_ref = torch.autograd.grad((ref * g.double()).sum(), (w_ref, table_ref), materialize_grads=True)
    same = table.to(dtype, copy=True).requires_grad_()  # the unsharded run in the same dtype and backend
    same_out = embedding_bag(idx, w.to(dtype), same, backend=backend)
    (same_out * g.to(dtype)).sum().backward()

    rows, cols = slice(sum(counts[:rank]), sum(counts[:rank + 1])), shard_columns(D, WORLD, rank)
    w_r = w[rows].to(dtype).reshape(*leading[rank], n).requires_grad_()
    shard = table[:, cols].to(dtype, copy=True).requires_grad_()
    out = sharded_embedding_bag(idx[rows].reshape(*leading[rank], n), w_r, shard, sparse_grad=sparse_grad,
                                backend=backend)
    (out * g[rows].reshape(out.shape).to(dtype)).sum().backward()
    gathered = gather_columns(shard.grad.to_dense(), D)  # the last collective
    try:
        assert out.shape == (*leading[rank], D) and out.dtype == dtype
        bound = BOUNDS[dtype]
        assert_rel_rms("out", out.reshape(-1, D), ref[rows], bound)
        assert_rel_rms("dweights", w_r.grad.reshape(-1, n), dw_ref[rows], bound)
        assert shard.grad.is_sparse == sparse_grad
        assert_rel_rms("dvalues (shards gathered)", gathered, dtable_ref, bound)
        # bit-exact against the unsharded run in the same dtype and backend: each column's bag and table gradient
        # run the same operations whatever the other columns (only the weights' gradient sums ranks' partials)
        assert torch.equal(out.reshape(-1, D), same_out[rows]), "out: not bit-exact"
        assert torch.equal(shard.grad.to_dense(), same.grad[:, cols]), "dvalues: not bit-exact"
    except AssertionError as e:
        return [f"{leading} {dtype} {backend} sparse_grad={sparse_grad}: {e}"]
    return []


@case
def op_different_counts_uneven_columns(rank):
    failures = [f for dtype, backend in ((torch.float32, "torch"), (torch.float32, "cpp"), (torch.float64, "torch"))
                for f in check_op(rank, [(2, 3), (4,)], dtype, backend=backend)]
    assert not failures, "\n".join(failures)


@case
def op_rank_without_tokens(rank):
    failures = check_op(rank, [(3, 2), (0,)])  # rank 1's shard gradient comes from rank 0's tokens only
    failures += check_op(rank, [(0,), (0,)])
    assert not failures, "\n".join(failures)


@case
def op_sparse_grad(rank):
    failures = check_op(rank, [(4,), (3,)], sparse_grad=True)
    assert not failures, "\n".join(failures)


@case
def memory_plus_with_ddp(rank):
    """The realistic use: data-parallel MemoryPlus, its table sharded (sparse gradient), wrapped in DDP
    (average_grad=True): every gradient is the unsharded one of the summed loss divided by the world size; then an
    SGD step and the way back give the unsharded model's update."""
    layer = MemoryPlus(HIDDEN, num_heads=2, num_keys=6, topk=3, key_dim=8, value_dim=7, sparse_grad=True)
    ref, before = float64_copy(layer), copy.deepcopy(layer)
    xs = [torch.randn(2, 5, HIDDEN), torch.randn(1, 3, HIDDEN)]  # 10 and 3 tokens
    gs = [torch.randn(x.shape) for x in xs]
    x_ref = [x.double().requires_grad_() for x in xs]
    out_ref = [ref(x) for x in x_ref]
    sum((o * g.double()).sum() for o, g in zip(out_ref, gs)).backward()

    model = DistributedDataParallel(shard_memory_values(layer))
    x = xs[rank].clone().requires_grad_()
    out = model(x)
    (out * gs[rank]).sum().backward()
    grads = {name: gather_columns(p.grad.to_dense(), layer.value_dim) if name == "values" else p.grad
             for name, p in layer.named_parameters()}
    torch.optim.SGD(layer.parameters(), lr=0.5).step()
    torch.optim.SGD(ref.parameters(), lr=0.5 / WORLD).step()  # ref holds the gradient of the sum, DDP of the mean
    unshard_memory_values(layer)  # the last collective: asserts from here on
    bound = BOUNDS[torch.float32]
    assert_rel_rms("out", out, out_ref[rank], bound)
    assert_rel_rms("dx", x.grad, x_ref[rank].grad, bound)
    for (name, grad), p_ref in zip(grads.items(), ref.parameters()):
        assert_rel_rms(f"d{name} * world", grad * WORLD, p_ref.grad, bound)
    for (name, p), p_ref, p0 in zip(layer.named_parameters(), ref.parameters(), before.parameters()):
        assert_rel_rms(f"{name}'s SGD update", p.detach() - p0, p_ref.detach() - p0.double(), bound)


@case
def shared_table_sparse_grad_and_unshard(rank):
    """ProductKeyMemory and MemoryPlus sharing one table, sparse gradients, average_grad=False, no tokens on rank 1,
    then the way back."""
    first = ProductKeyMemory(HIDDEN, num_heads=2, num_keys=5, topk=2, key_dim=8, sparse_grad=True)
    model = nn.Sequential(first, MemoryPlus(HIDDEN, num_heads=2, num_keys=5, topk=2, key_dim=8, values=first.values,
                                           sparse_grad=True))
    ref, table = float64_copy(model), first.values.detach().clone()
    xs = [torch.randn(2, 4, HIDDEN), torch.randn(0, HIDDEN)]
    sum(ref(x.double()).sum() for x in xs).backward()

    shard_memory_values(model, average_grad=False)
    shared, ignored = model[1].values is model[0].values, model._ddp_params_and_buffers_to_ignore
    model(xs[rank]).sum().backward()
    sparse = model[0].values.grad.is_sparse
    grads = {name: gather_columns(p.grad.to_dense(), HIDDEN) if name.endswith("values") else p.grad
             for name, p in model.named_parameters()}
    for name, grad in grads.items():
        if not name.endswith("values"):
            dist.all_reduce(grad)  # the replicated parameters' gradients summed over ranks
    unshard_memory_values(model)  # the last collective: asserts from here on
    assert shared and ignored == ["0.values", "1.values"] and sparse
    for (name, grad), p_ref in zip(grads.items(), ref.parameters()):
        assert_rel_rms(f"d{name}", grad, p_ref.grad, BOUNDS[torch.float32])
    assert torch.equal(model[0].values, table) and model[1].values is model[0].values
    assert model[0].values_group is None and model._ddp_params_and_buffers_to_ignore == []


@case
def errors_in_a_group(rank):
    n = 3 + rank
    with pytest.raises(ValueError, match=r"same rows per bag n \(indices.shape\[-1\]\), got \[3, 4\]"):
        sharded_embedding_bag(torch.zeros(2, n, dtype=torch.long), torch.ones(2, n), torch.ones(4, 2))
    with pytest.raises(ValueError, match="no ProductKeyMemory / MemoryPlus layer in Linear"):
        shard_memory_values(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="D = 1 columns cannot give each of 2 ranks at least one"):
        shard_memory_values(ProductKeyMemory(HIDDEN, num_heads=1, num_keys=2, topk=1, key_dim=2, value_dim=1))
    layer = shard_memory_values(ProductKeyMemory(HIDDEN, num_heads=1, num_keys=2, topk=1, key_dim=2))
    with pytest.raises(ValueError, match="ProductKeyMemory's value table is already sharded"):
        shard_memory_values(layer)


def _worker(rank, store, out_dir):
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)  # as tests/conftest.py: fresh allocations are NaN
    torch.utils.deterministic.fill_uninitialized_memory = True
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=30))  # a case that desyncs the ranks fails, not hangs
    errors = {}
    for name, fn in CASES.items():
        torch.manual_seed(0)  # every rank draws the same model and data; each takes its own tokens
        try:
            fn(rank)
            errors[name] = None
        except Exception:
            errors[name] = traceback.format_exc()
    dist.destroy_process_group()
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(errors, f)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Runs every case on 2 spawned gloo processes (a FileStore in a fresh tmp dir: no port to pick)."""
    tmp = tmp_path_factory.mktemp("sharding")
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD)
    results = []
    for rank in range(WORLD):
        with open(tmp / f"rank{rank}.json") as f:
            results.append(json.load(f))
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks(two_ranks, name):
    errors = [f"rank {rank}:\n{result[name]}" for rank, result in enumerate(two_ranks) if result[name]]
    assert not errors, "\n".join(errors)


def test_shard_columns_split_as_tensor_split():
    for dim in range(1, 11):
        for world in range(1, 5):
            sizes = [len(range(dim)[shard_columns(dim, world, r)]) for r in range(world)]
            assert sizes == [len(part) for part in torch.arange(dim).tensor_split(world)]
            starts = [shard_columns(dim, world, r).start for r in range(world)]
            assert starts == list(itertools.accumulate([0] + sizes[:-1]))


def test_errors_without_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="sharded_embedding_bag: no default process group"):
        sharded_embedding_bag(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), torch.ones(4, 2))
    with pytest.raises(RuntimeError, match="shard_memory_values: no default process group"):
        shard_memory_values(ProductKeyMemory(HIDDEN, num_heads=1, num_keys=2, topk=1, key_dim=2))
