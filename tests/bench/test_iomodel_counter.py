"""The IO/FLOP counter counts exactly on kernels whose traffic is known by hand."""

import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))  # as the bench scripts see it
from iomodel.counter import LOAD, STORE, counting  # noqa: E402


@triton.jit
def copy_kernel(x, y, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y + o, tl.load(x + o, mask=o < n), mask=o < n)


@triton.jit
def matmul_kernel(a, b, c, M, N, K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """c = a @ b, row-major, one program per [BM, BN] tile of c, walking K in BK steps."""
    o_m = tl.program_id(0) * BM + tl.arange(0, BM)
    o_n = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for i in range(K // BK):
        o_k = i * BK + tl.arange(0, BK)
        b_a = tl.load(a + o_m[:, None] * K + o_k[None, :], mask=(o_m < M)[:, None], other=0)
        b_b = tl.load(b + o_k[:, None] * N + o_n[None, :], mask=(o_n < N)[None, :], other=0)
        acc += tl.dot(b_a, b_b)
    tl.store(c + o_m[:, None] * N + o_n[None, :], acc, mask=(o_m < M)[:, None] & (o_n < N)[None, :])


@triton.jit
def even_lanes_kernel(x, y, BLOCK: tl.constexpr):
    """Loads only the even lanes of x, stores every lane of y (odd ones get 0)."""
    o = tl.arange(0, BLOCK)
    tl.store(y + o, tl.load(x + o, mask=o % 2 == 0, other=0))


@pytest.mark.parametrize("n, dtype", [(1000, torch.float32), (64, torch.float16), (129, torch.bfloat16)])
def test_copy_counts_two_bytes_per_element_with_masked_tail(n, dtype):
    x = torch.randn(n).to(dtype)
    y = torch.empty_like(x)
    with counting() as launches:
        copy_kernel[(triton.cdiv(n, 64),)](x, y, n, BLOCK=64)
    (launch,) = launches
    assert torch.equal(y, x)
    assert launch.kernel == "copy_kernel" and launch.grid == (triton.cdiv(n, 64), 1, 1)
    assert launch.by_argument() == {"x": {LOAD: n * x.element_size()}, "y": {STORE: n * x.element_size()}}
    assert launch.total() == launch.unique_bytes() == 2 * n * x.element_size()
    assert launch.flops == 0


def test_tiled_matmul_loads_each_operand_once_per_tile_of_the_other():
    M, N, K, BM, BN, BK = 48, 80, 64, 16, 32, 16
    a, b = torch.randn(M, K), torch.randn(K, N)
    c = torch.empty(M, N)
    with counting() as launches:
        matmul_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](a, b, c, M, N, K=K, BM=BM, BN=BN, BK=BK)
    (launch,) = launches
    torch.testing.assert_close(c, a @ b)
    tiles_n = triton.cdiv(N, BN)  # 3 column tiles: the last is half masked, so b is read exactly once each
    assert launch.by_argument() == {"a": {LOAD: M * K * 4 * tiles_n}, "b": {LOAD: K * N * 4 * (M // BM)},
                                    "c": {STORE: M * N * 4}}
    assert launch.unique_bytes(LOAD) == (M * K + K * N) * 4
    # every program runs full BM x BN x BK dots, the masked lanes included: the tensor cores do that work
    assert launch.flops == 2 * (M // BM) * tiles_n * BM * BN * K == 2 * M * (tiles_n * BN) * K


def test_masked_off_lanes_move_no_bytes():
    x, y = torch.randn(64), torch.empty(64)
    with counting() as launches:
        even_lanes_kernel[(1,)](x, y, BLOCK=64)
    assert launches[0].by_argument() == {"x": {LOAD: 32 * 4}, "y": {STORE: 64 * 4}}


def test_counting_restores_the_interpreter():
    from triton.runtime import interpreter

    with counting():
        pass
    assert "create_masked_load" not in vars(interpreter.interpreter_builder)
    x, y = torch.randn(8), torch.empty(8)
    copy_kernel[(1,)](x, y, 8, BLOCK=8)  # runs uncounted, outside any launch record
    assert torch.equal(x, y)
