"""Backward kernels of `embedding_bag`: the value table's gradient over the reverse index, and the weights'.

With E = M * n entries (b, j) sorted by row, stably (`ops/embedding_bag.py: reverse_index`: rows [U], order
[E], offsets [U]):

- `embedding_bag_bwd_values_kernel`: a program owns BU touched rows and BD columns and walks each row's run
  of entries in `order`, summing w[e] * dout[bag(e)] in that fixed order: deterministic, no atomics, and the
  [U, D] result holds only the touched rows (made dense or sparse by the caller). With HAS_DW it also gives
  the weights' gradient: each entry's dout tile is already loaded, and every entry of the run reads the same
  value row, loaded once per program, so dweights[e] = <dout[bag(e)], values[row]> costs one multiply-add
  and a row sum per entry. The alternative, the separate kernel below, gathers a value row per entry
  (E * D elements, as much traffic as the whole values pass). The fused dot is split over the D blocks, so
  it writes partial sums [D / BD, E] (fp32; far smaller than the E * D gather) that the host adds in a fixed
  order. Runs longer than SEGMENT entries (a popular row) are cut into segments summed in a second pass of
  the same kernel, so no program serialises a whole hot row (see `embedding_bag_bwd_values`).
- `embedding_bag_bwd_weights_kernel`: dweights alone, over the flat entries (E blocks x a loop over D); used
  when the table needs no gradient (a frozen memory).

Accumulation is fp32 (float64 for float64 inputs); outputs in the dtype of their input.
"""

import torch
import triton
import triton.language as tl

from ipl_layers.kernels.common.registry import CompileCase, register
from ipl_layers.kernels.memory.embedding_bag_fwd import BLOCK_D, NUM_STAGES, NUM_WARPS, acc_dtype, block_d

# Tiles of [4, 128] (values) and [8, 128] (weights) on 4 warps, one stage (see embedding_bag_fwd.py): 64-78
# and 48-56 registers, no spills (sm_80, sm_90). [16, 128] values tiles take ~220 (a third of the occupancy);
# short row blocks also waste less on masked iterations when run lengths differ (a block loops to its longest).
BLOCK_U = 4  # touched rows per values program
SEGMENT = 256  # entries a values program walks per row at most (longer runs are split: see the launcher)
BLOCK_E = 8  # entries per weights program


@triton.jit
def embedding_bag_bwd_values_kernel(
    w,  # [E] (the weights [M, n], flat)
    values,  # [N, D]
    dout,  # [M, D]
    rows,  # [U] the touched rows, ascending
    order,  # [E] int64: entries sorted by row, stably
    offsets,  # [U] int64: start of each row's run (or segment of a run) in `order`
    per_row,  # [U, D]: each touched row's gradient in the dtype of values (fp32 for segment partials)
    dw_part,  # [cdiv(D, BD), E] fp32: partial dweights per D block (HAS_DW)
    U,
    E,
    n,
    D,
    BU: tl.constexpr,
    BD: tl.constexpr,
    HAS_DW: tl.constexpr,
    ACC: tl.constexpr,
):
    i_d = tl.program_id(1)
    o_u = tl.program_id(0) * BU + tl.arange(0, BU)  # [BU]
    o_d = i_d * BD + tl.arange(0, BD)  # [BD]
    m_u, m_d = o_u < U, o_d < D
    start = tl.load(offsets + o_u, mask=m_u, other=0)  # [BU]
    end = tl.load(offsets + o_u + 1, mask=o_u + 1 < U, other=E)  # the next run's start; E after the last
    count = tl.where(m_u, end - start, 0)  # [BU] entries per row
    if HAS_DW:
        r = tl.load(rows + o_u, mask=m_u, other=0).to(tl.int64)
        v = tl.load(values + r[:, None] * D + o_d[None, :], mask=m_u[:, None] & m_d[None, :], other=0.0).to(ACC)
    acc = tl.zeros([BU, BD], dtype=ACC)
    for k in range(tl.max(count, axis=0)):  # rows shorter than the block's longest run are masked
        m_k = k < count  # [BU]
        e = tl.load(order + start + k, mask=m_k, other=0)  # [BU] entry b * n + j
        bag = e // n
        g = tl.load(dout + bag[:, None] * D + o_d[None, :], mask=m_k[:, None] & m_d[None, :], other=0.0)
        g = g.to(ACC)  # [BU, BD]
        acc += tl.load(w + e, mask=m_k, other=0.0).to(ACC)[:, None] * g
        if HAS_DW:
            dot = tl.sum(g * v, axis=1)  # [BU] this D block's part of dweights[e]
            tl.store(dw_part + i_d.to(tl.int64) * E + e, dot.to(dw_part.dtype.element_ty), mask=m_k)
    p = per_row + o_u.to(tl.int64)[:, None] * D + o_d[None, :]
    tl.store(p, acc.to(per_row.dtype.element_ty), mask=m_u[:, None] & m_d[None, :])


@triton.jit
def embedding_bag_bwd_weights_kernel(
    idx,  # [E] int32/int64 (the indices [M, n], flat)
    values,  # [N, D]
    dout,  # [M, D]
    dw,  # [E] in the dtype of the weights
    E,
    n,
    D,
    BE: tl.constexpr,
    BD: tl.constexpr,
    ACC: tl.constexpr,
):
    o_e = tl.program_id(0).to(tl.int64) * BE + tl.arange(0, BE)  # [BE]
    m_e = o_e < E
    r = tl.load(idx + o_e, mask=m_e, other=0).to(tl.int64)  # [BE]
    bag = o_e // n  # consecutive entries share a bag: its dout tile comes from cache after the first
    acc = tl.zeros([BE, BD], dtype=ACC)  # reduced over columns once, after the loop
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m = m_e[:, None] & (o_d < D)[None, :]
        v = tl.load(values + r[:, None] * D + o_d[None, :], mask=m, other=0.0).to(ACC)  # [BE, BD]
        acc += v * tl.load(dout + bag[:, None] * D + o_d[None, :], mask=m, other=0.0).to(ACC)
    tl.store(dw + o_e, tl.sum(acc, axis=1).to(dw.dtype.element_ty), mask=m_e)


def _values_pass(w, values, dout, rows, order, offsets, per_row, dw_part, n):
    """One launch of the values kernel over the runs starting at `offsets`; dweights' partials when dw_part."""
    U, (E,), D = offsets.shape[0], order.shape, per_row.shape[1]
    if U and D:
        BD = block_d(D)
        grid = (triton.cdiv(U, BLOCK_U), triton.cdiv(D, BD))
        embedding_bag_bwd_values_kernel[grid](w, values, dout, rows, order, offsets, per_row,
                                              per_row if dw_part is None else dw_part, U, E, n, D, BU=BLOCK_U,
                                              BD=BD, HAS_DW=dw_part is not None, ACC=acc_dtype(values.dtype),
                                              num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def embedding_bag_bwd_values(w, values, dout, rows, order, offsets, with_dw: bool):
    """The touched rows' gradients per_row [U, D] (dtype of values) and, with `with_dw`, dweights [E] (fp32,
    or float64) from the fused partial dots. w [E], values [N, D], dout [M, D] contiguous; rows, order,
    offsets as `reverse_index` gives them (int64).

    A program walks its rows' runs one entry at a time, so one very popular row (a run of thousands of
    entries) would leave a single program working long after the others. When a run exceeds SEGMENT
    entries, every run is cut into segments of at most SEGMENT: the kernel sums each segment into an fp32
    partial [S, D], and a second launch of the same kernel (weights 1, the partials as its `dout`, one slot
    per bag) sums each row's partials in segment order. Both passes are fixed-order: still deterministic."""
    U, (E,), D = rows.shape[0], order.shape, values.shape[1]
    n = E // dout.shape[0] if dout.shape[0] else 0
    per_row = values.new_empty(U, D)
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    dw_part = torch.empty(triton.cdiv(D, block_d(D)), E, dtype=acc, device=values.device) if with_dw else None
    counts = torch.diff(offsets, append=offsets.new_full((1,), E))  # [U] entries per row
    if U and D and int(counts.max()) > SEGMENT:
        n_seg = triton.cdiv(counts, SEGMENT)  # [U] segments per row
        first = torch.cumsum(n_seg, 0) - n_seg  # [U] each row's first segment
        seg_row = torch.repeat_interleave(torch.arange(U, device=rows.device), n_seg)  # [S]
        seg_start = offsets[seg_row] + SEGMENT * (torch.arange(seg_row.shape[0], device=rows.device) - first[seg_row])
        partial = torch.empty(seg_row.shape[0], D, dtype=acc, device=values.device)  # [S, D]
        _values_pass(w, values, dout, rows[seg_row], order, seg_start, partial, dw_part, n)
        ones, seg_order = partial.new_ones(partial.shape[0]), torch.arange(partial.shape[0], device=rows.device)
        _values_pass(ones, values, partial, rows, seg_order, first, per_row, None, 1)
    else:
        _values_pass(w, values, dout, rows, order, offsets, per_row, dw_part, n)
    if not with_dw:
        return per_row, None
    if D == 0:  # no columns: every dot is empty
        return per_row, dw_part.new_zeros(E)
    return per_row, (dw_part[0] if dw_part.shape[0] == 1 else dw_part.sum(0))  # the D blocks in a fixed order


def embedding_bag_bwd_weights(idx, values, dout, dtype: torch.dtype) -> torch.Tensor:
    """dweights [E] in `dtype`: <dout[b], values[idx[b, j]]> for the flat entries of idx [M, n] (contiguous)."""
    E, n, D = idx.numel(), idx.shape[-1], values.shape[1]
    if D == 0:  # no columns: every dot is empty
        return torch.zeros(E, dtype=dtype, device=values.device)
    dw = torch.empty(E, dtype=dtype, device=values.device)
    if E:
        embedding_bag_bwd_weights_kernel[(triton.cdiv(E, BLOCK_E),)](
            idx, values, dout, dw, E, n, D, BE=BLOCK_E, BD=block_d(D), ACC=acc_dtype(values.dtype),
            num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return dw


def _register_cases():
    """bf16 and fp32 (values, weights and dout of one dtype): the values kernel with and without the fused
    dweights (its rows, order and offsets are int64) and, for bf16, its two passes over split runs; the weights
    kernel with int64 and int32 indices. D and n are runtime arguments and D >= 128 launches BD = 128, so one
    case per variant covers D = 256/512/1024, n = 128."""
    for dtype in ("bf16", "fp32"):
        p = "*" + dtype
        base = {"w": p, "values": p, "dout": p, "rows": "*i64", "order": "*i64", "offsets": "*i64", "per_row": p,
                "dw_part": "*fp32", "U": "i32", "E": "i32", "n": "i32", "D": "i32", "BU": "constexpr",
                "BD": "constexpr", "HAS_DW": "constexpr", "ACC": "constexpr"}
        variants = [("", {}, True), ("", {}, False)]
        if dtype != "fp32":  # split runs: fp32 partials out of the first pass, into the second
            fp32 = {"per_row": "*fp32"}, {"w": "*fp32", "dout": "*fp32"}
            variants += [("segments,", fp32[0], True), ("segments,", fp32[0], False), ("segment-sum,", fp32[1], False)]
        for tag, types, has_dw in variants:
            register(CompileCase(
                name=f"embedding_bag_bwd_values_kernel[{dtype},{tag}HAS_DW={has_dw},BU={BLOCK_U},BD={BLOCK_D}]",
                fn=embedding_bag_bwd_values_kernel,
                signature={**base, **types},
                constexprs={"BU": BLOCK_U, "BD": BLOCK_D, "HAS_DW": has_dw, "ACC": tl.float32},
                num_warps=NUM_WARPS, num_stages=NUM_STAGES,
            ))
        for ity in ("i64", "i32"):
            register(CompileCase(
                name=f"embedding_bag_bwd_weights_kernel[{dtype},{ity},BE={BLOCK_E},BD={BLOCK_D}]",
                fn=embedding_bag_bwd_weights_kernel,
                signature={"idx": "*" + ity, "values": p, "dout": p, "dw": p, "E": "i32", "n": "i32", "D": "i32",
                           "BE": "constexpr", "BD": "constexpr", "ACC": "constexpr"},
                constexprs={"BE": BLOCK_E, "BD": BLOCK_D, "ACC": tl.float32},
                num_warps=NUM_WARPS, num_stages=NUM_STAGES,
            ))


_register_cases()
