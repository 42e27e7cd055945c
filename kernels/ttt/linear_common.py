"""Shared pieces of the `ttt_linear` Triton kernels: tl.dot, [K, K] tile pointers, sequence spans, the slots
of the per-mini-batch saved weights, the launch-size checks and the compile-case registration.

Tiles are feature-major: a mini-batch's tokens are the columns of [BK, C] tiles (BK = K rounded up to a
power of two >= 16, the smallest tl.dot operand; padding rows are zero). Every product then has the
feature dim as M (Triton lays chained dots out with all warps along M when M >= N, which in the
token-major orientation would copy each [C, K] tile into every warp).
"""

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

# tl.dot precision of the fp32 tiles on a GPU: TF32 (10-bit mantissa: ~1e-3 relative error per product;
# the interpreter's products are exact). "tf32x3" would recover fp32 accuracy, but it holds two copies of
# each operand: at K = 64 the forward alone then spilled 1.8 KB on sm_90.
DOT_PRECISION = tl.constexpr("tf32")
# tl.dot needs >= 16 tokens a tile. At K = 64 only b = 16 runs without spills (b = 32 spills in three of the
# four kernels, b = 64 in all); the registered compile cases are b = 16.
MINI_BATCH_SIZES = (16, 32, 64)
MAX_K = 64  # W or its gradient [K, K] in fp32 registers of one program


@triton.jit
def dot(a, b, acc=None):
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def kk_ptrs(base, o_k, K: tl.constexpr, TRANSPOSE: tl.constexpr, AGAIN: tl.constexpr):
    """Pointers [BK, BK] to a row-major [K, K] matrix at `base` (to its transpose with TRANSPOSE). Built from
    [BK] pointers off `base` so that no [BK, BK] offset tensor is loop-invariant: one hoisted out of the
    mini-batch loop would hold BK * BK / 128 registers a thread (4 warps) for the whole sequence. AGAIN
    builds the same pointers by other operations, for a second read the compiler must not merge with the
    first (`linear_minibatch.load_tokens`)."""
    rows, cols = o_k * K, o_k  # offsets along the tile's dims 0 and 1
    if TRANSPOSE:
        rows, cols = o_k, o_k * K
    if AGAIN:
        return (base + cols)[None, :] + rows[:, None]
    return (base + rows)[:, None] + cols[None, :]


@triton.jit
def load_kk(base, o_k, K: tl.constexpr, BK: tl.constexpr, TRANSPOSE: tl.constexpr = False,
            AGAIN: tl.constexpr = False):
    """A [K, K] matrix (or its transpose) as a [BK, BK] fp32 tile, zero in the padding (no mask when K == BK)."""
    ptrs = kk_ptrs(base, o_k, K, TRANSPOSE, AGAIN)
    if K == BK:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=(o_k < K)[:, None] & (o_k < K)[None, :], other=0)
    return x.to(tl.float32)


@triton.jit
def store_kk(base, x, o_k, K: tl.constexpr, BK: tl.constexpr, TRANSPOSE: tl.constexpr = False):
    """Stores the [BK, BK] tile x (or its transpose) into the [K, K] matrix at `base`, padding dropped."""
    ptrs = kk_ptrs(base, o_k, K, TRANSPOSE, False)
    if K == BK:
        tl.store(ptrs, x.to(base.dtype.element_ty))
    else:
        tl.store(ptrs, x.to(base.dtype.element_ty), mask=(o_k < K)[:, None] & (o_k < K)[None, :])


@triton.jit
def sequence_span(cu_seqlens, i_n, T, IS_VARLEN: tl.constexpr):
    """First and one-past-last token of sequence i_n in the flattened [B * T] token axis."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    return bos, eos


@triton.jit
def first_slot(bos, i_n, C: tl.constexpr):
    """Index of sequence i_n's first mini-batch in the saved per-mini-batch weights (see `num_slots`)."""
    return bos // C + 2 * i_n


def num_slots(n_tokens: int, N: int, C: int) -> int:
    """Slots of the saved per-mini-batch start weights. Sequence n (tokens [bos, eos), continuing at
    position p < C) spans cdiv(p + len, C) <= len // C + 2 mini-batches; its slots start at bos // C + 2 n,
    and bos // C grows by at least len // C to the next sequence, so the ranges never overlap."""
    return n_tokens // C + 2 * N


def block_k(K: int) -> int:
    """The padded feature width BK: a power of two >= 16 (tl.dot's smallest operand)."""
    if K > MAX_K:
        raise ValueError(f"ttt_linear Triton kernels: K = {K} > {MAX_K} (W [K, K] and its gradient must fit one "
                         "program's registers); use the torch backend")
    return max(16, triton.next_power_of_2(K))


def check_mini_batch_size(C: int):
    if C not in MINI_BATCH_SIZES:
        raise ValueError(f"ttt_linear Triton kernels: mini_batch_size = {C} is not one of {MINI_BATCH_SIZES} "
                         "(tl.dot needs >= 16 rows); use the torch backend")


class TTTLinearSaved(NamedTuple):
    """What the forward hands to the backward: the inner weights at every mini-batch start."""

    Ws: torch.Tensor  # [NS, H, K, K] fp32, slot first_slot(n) + m: W at the start of sequence n's mini-batch m
    bs: Optional[torch.Tensor]  # [NS, H, K] fp32 likewise for b (None without bias)


class Launch(NamedTuple):
    """Sizes, parameters and flags shared by the forward and backward launches."""

    N: int  # sequences
    C: int  # mini-batch size
    ln_weight: torch.Tensor  # [H, K]
    ln_bias: torch.Tensor  # [H, K]
    scale: torch.Tensor  # [H, C] fp32 contiguous
    flags: dict  # the kernels' shared constexprs


def prepare(q, ln_weight, ln_bias, scale, sum_W0, position0, cu_seqlens, C, use_ln, use_residual,
            use_bias) -> Launch:
    """Checks the sizes the kernels support and normalises the per-head parameters."""
    B, T, H, K = q.shape
    check_mini_batch_size(C)
    BK = block_k(K)
    if scale.shape[-1] != C:
        raise ValueError(f"scale: expected [H, b] with b = mini_batch_size = {C}, got shape {list(scale.shape)}")
    if (sum_W0 is None) != (position0 is None):
        raise ValueError("sum_W0 and position0: give both (an open mini-batch) or neither")
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    ln_weight = q.new_ones(H, K) if ln_weight is None else ln_weight.contiguous()
    ln_bias = q.new_zeros(H, K) if ln_bias is None else ln_bias.contiguous()
    scale = scale.to(torch.float32).expand(H, C).contiguous()
    flags = dict(H=H, K=K, BK=BK, C=C, USE_LN=bool(use_ln), USE_RESIDUAL=bool(use_residual),
                 USE_BIAS=bool(use_bias), USE_SUMS=sum_W0 is not None, IS_VARLEN=cu_seqlens is not None)
    return Launch(N, C, ln_weight, ln_bias, scale, flags)


def contiguous(*xs):
    return [None if x is None else x.contiguous() for x in xs]


def bias_states(use_bias, W0, b0, sum_W0, sum_b0):
    """b0, sum_b0 as the kernels read them: None without bias, zeros where only W0 / sum_W0 came."""
    if not use_bias:
        return None, None
    if b0 is None and W0 is not None:
        b0 = W0.new_zeros(W0.shape[:-1])
    if sum_b0 is None and sum_W0 is not None:
        sum_b0 = sum_W0.new_zeros(sum_W0.shape[:-1])
    return contiguous(b0, sum_b0)


# Shapes of the registered compile cases: the head dim and mini-batch size TTT-Linear uses.
CASE_HEADS, CASE_K, CASE_C = 4, 64, 16


def register_case(kernel, variant: str, args: dict, num_warps: Optional[int] = None):
    """Registers `kernel`'s compile case (its default config, or `num_warps` for a kernel without autotuning);
    `args` maps every argument to its Triton type (a string) or to its constexpr value."""
    from ipl_layers.kernels.common.registry import CompileCase, register

    jit = kernel if num_warps is not None else kernel.fn
    names = jit.arg_names
    missing = [a for a in names if a not in args]
    if missing:
        raise ValueError(f"{jit.fn.__name__}: compile case {variant!r} leaves {missing} untyped")
    config = triton.Config({}, num_warps=num_warps, num_stages=1) if num_warps is not None else kernel.default_config
    register(CompileCase(
        name=f"{jit.fn.__name__}[{variant}]",
        fn=jit,
        signature={a: args[a] if isinstance(args[a], str) else "constexpr" for a in names},
        constexprs={a: args[a] for a in names if not isinstance(args[a], str)},
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    ))


def case_constexprs() -> dict:
    """The constexprs every registered case shares: K = 64, b = 16, all flags on, an open initial mini-batch."""
    return {"H": CASE_HEADS, "K": CASE_K, "BK": CASE_K, "C": CASE_C, "USE_LN": True, "USE_RESIDUAL": True,
            "USE_BIAS": True, "USE_SUMS": True, "IS_VARLEN": False}
