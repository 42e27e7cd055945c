"""Forward kernel of `embedding_bag`: out[b] = sum_j w[b, j] * values[idx[b, j]].

A program owns BM bags and BD columns and walks the n slots in order, gathering one [BM, BD] tile of value
rows per slot into an fp32 accumulator (float64 for float64 values): every touched value byte is read once
per (bag, slot), the output written once, and nothing else goes through memory. The slot loop runs in order,
so the result does not depend on the launch. Indices may be int32 or int64; offsets are formed in int64
(N * D can pass 2**31).
"""

import torch
import triton
import triton.language as tl

from ipl_layers.kernels.common.registry import CompileCase, register

# Tiles of [16, 128] on 4 warps: 56-96 registers, no spills (sm_80, sm_90); [32, 128] needs ~200-255 and spills
# on sm_90 with int32 indices. One stage: each gathered address depends on a load of the same iteration,
# so software pipelining has nothing to overlap (same registers either way); the launch states it so that
# it runs the compiled case (Triton's launch default is 3).
BLOCK_M = 16  # bags per program
BLOCK_D = 128  # columns per program (at most): a 256-byte bf16 segment of each gathered row
NUM_WARPS = 4
NUM_STAGES = 1


@triton.jit
def embedding_bag_fwd_kernel(
    idx,  # [M, n] int32/int64
    w,  # [M, n]
    values,  # [N, D]
    out,  # [M, D] in the dtype of values
    M,
    n,
    D,
    BM: tl.constexpr,
    BD: tl.constexpr,
    ACC: tl.constexpr,  # tl.float32, or tl.float64 for float64 values
):
    o_m = tl.program_id(0) * BM + tl.arange(0, BM)  # [BM]
    o_d = tl.program_id(1) * BD + tl.arange(0, BD)  # [BD]
    m_m, m_d = o_m < M, o_d < D
    m = m_m[:, None] & m_d[None, :]
    p_bag = o_m.to(tl.int64) * n  # [BM] first slot of each bag
    acc = tl.zeros([BM, BD], dtype=ACC)
    for j in range(n):
        r = tl.load(idx + p_bag + j, mask=m_m, other=0).to(tl.int64)  # [BM]
        wj = tl.load(w + p_bag + j, mask=m_m, other=0.0).to(ACC)  # [BM]
        v = tl.load(values + r[:, None] * D + o_d[None, :], mask=m, other=0.0).to(ACC)  # [BM, BD]
        acc += wj[:, None] * v
    tl.store(out + o_m.to(tl.int64)[:, None] * D + o_d[None, :], acc.to(out.dtype.element_ty), mask=m)


def acc_dtype(dtype: torch.dtype):
    """The accumulation dtype of the kernels: fp32, float64 for float64 inputs."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def block_d(D: int) -> int:
    return min(BLOCK_D, triton.next_power_of_2(max(D, 1)))


def embedding_bag_fwd(idx: torch.Tensor, w: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """idx [M, n] int32/int64, w [M, n], values [N, D] (contiguous) -> out [M, D] in the dtype of values.
    An empty bag (n = 0) gives zeros."""
    M, n = idx.shape
    D = values.shape[1]
    out = values.new_empty(M, D)
    if M and D:
        BD = block_d(D)
        grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(D, BD))
        embedding_bag_fwd_kernel[grid](idx, w, values, out, M, n, D, BM=BLOCK_M, BD=BD,
                                       ACC=acc_dtype(values.dtype), num_warps=NUM_WARPS,
                                       num_stages=NUM_STAGES)
    return out


def _register_cases():
    """bf16 and fp32 tables with weights of the same dtype, int64 and int32 indices; D >= 128 launches
    BD = 128 whatever D is, so one case per dtype covers D = 256/512/1024."""
    for dtype in ("bf16", "fp32"):
        for ity in ("i64", "i32"):
            register(CompileCase(
                name=f"embedding_bag_fwd_kernel[{dtype},{ity},BM={BLOCK_M},BD={BLOCK_D}]",
                fn=embedding_bag_fwd_kernel,
                signature={"idx": "*" + ity, "w": "*" + dtype, "values": "*" + dtype, "out": "*" + dtype,
                           "M": "i32", "n": "i32", "D": "i32", "BM": "constexpr", "BD": "constexpr",
                           "ACC": "constexpr"},
                constexprs={"BM": BLOCK_M, "BD": BLOCK_D, "ACC": tl.float32},
                num_warps=NUM_WARPS, num_stages=NUM_STAGES,
            ))


_register_cases()
