"""Triton kernels of `short_conv`: forward, backward and the fused decode step.

Sequences are flattened to rows of [B*T, D] (or the packed [T, D] with `cu_seqlens`). A forward program
owns BT positions of one sequence and BD channels; tap w reads the tile shifted by w-(W-1) rows, taking
rows before the sequence start from the state h0 [N, D, W-1] (oldest first). Shifted re-reads hit L1/L2,
so HBM traffic stays near one read of x and one write of y. A backward program walks a chunk of BC rows
in tiles of BT, so the dweight/dbias partial sums (one row per program, reduced on the host) stay small.
With `cu_seqlens` a host-built table maps program ids to (sequence, block); every sequence gets at least
one block, which writes the state of empty and short sequences. Loads are cast to fp32 before any math.
Tile sizes keep the default configs free of register spills: every shifted tile keeps its own
addresses and masks live, and the backward's silu recompute reads 2W-1 shifted x tiles and W dy tiles,
hence its 8-row tiles.
"""

import torch
import triton
import triton.language as tl

from ipl_layers.kernels.common.autotune import autotune
from ipl_layers.kernels.common.registry import CompileCase, register

# Rows per forward program, rows per backward tile and per backward program. Fixed (not tuned): the
# program tables and the number of dweight/dbias partial-sum rows depend on them.
FWD_BLOCK_T = 32
BWD_BLOCK_T = 8
BWD_CHUNK = 256


@triton.jit
def _sequence(cu_seqlens, chunk_table, T, IS_VARLEN: tl.constexpr):
    """(sequence n, block index in it, first row, length) of this program."""
    if IS_VARLEN:
        i_n = tl.load(chunk_table + 2 * tl.program_id(0)).to(tl.int32)
        i_t = tl.load(chunk_table + 2 * tl.program_id(0) + 1).to(tl.int32)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        L = (tl.load(cu_seqlens + i_n + 1) - bos).to(tl.int32)
    else:
        i_n = tl.program_id(2)
        i_t = tl.program_id(0)
        bos = i_n.to(tl.int64) * T
        L = T
    return i_n, i_t, bos, L


@triton.jit
def _load_x(x_blk, t0, rel, o_d, m_d, L, D):
    """x at rows `rel` [BT] of the block starting at position t0, channels `o_d` [BD]; zeros outside the
    sequence. Offsets are int32 relative to the block's row pointer `x_blk`. Returns fp32 [BT, BD]."""
    pos = t0 + rel
    m_x = (pos >= 0) & (pos < L)
    return tl.load(x_blk + rel[:, None] * D + o_d[None, :], mask=m_x[:, None] & m_d[None, :], other=0.0).to(tl.float32)


@triton.jit
def _load_state(h_seq, pos, o_d, m_d, W: tl.constexpr):
    """The state at positions `pos` [BT] before the sequence start (slot pos + W-1), zeros at pos >= 0.
    Returns fp32 [BT, BD]. Only a sequence's first tile reads it: kernels peel that tile off, so the
    other tiles carry no state addresses in registers."""
    # Clamped slot: in range for masked-off rows too, and no contiguity along T for the compiler to chase
    # (it would pick a T-major layout for this load and convert it through shared memory).
    slot = tl.maximum(pos + (W - 1), 0)
    p_h = h_seq + o_d[None, :] * (W - 1) + slot[:, None]
    return tl.load(p_h, mask=(pos < 0)[:, None] & m_d[None, :], other=0.0).to(tl.float32)


@triton.jit
def _state_part(weight, h_seq, pos, o_d, m_d, W: tl.constexpr):
    """sum_w weight[:, w] * state at x_{pos-(W-1)+w} for the taps that reach before the start, [BT, BD]."""
    z = tl.zeros([pos.shape[0], o_d.shape[0]], dtype=tl.float32)
    for w in tl.static_range(W - 1):
        tap = tl.load(weight + o_d * W + w, mask=m_d, other=0.0).to(tl.float32)  # [BD]
        z += tap[None, :] * _load_state(h_seq, pos + (w - (W - 1)), o_d, m_d, W)
    return z


@triton.jit
def _preactivation(x_blk, weight, bias, h_seq, t0, rel, o_d, m_d, L, D,
                   W: tl.constexpr, HAS_BIAS: tl.constexpr, WITH_STATE: tl.constexpr):
    """z = bias + sum_w weight[:, w] * x_{pos-(W-1)+w} at block rows `rel`, fp32 [BT, BD]; positions
    before the start read the state when WITH_STATE, else zeros."""
    z = tl.zeros([rel.shape[0], o_d.shape[0]], dtype=tl.float32)
    if HAS_BIAS:
        z += tl.load(bias + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
    for w in tl.static_range(W):
        tap = tl.load(weight + o_d * W + w, mask=m_d, other=0.0).to(tl.float32)  # [BD]
        z += tap[None, :] * _load_x(x_blk, t0, rel + (w - (W - 1)), o_d, m_d, L, D)
    if WITH_STATE:
        z += _state_part(weight, h_seq, t0 + rel, o_d, m_d, W)
    return z


@triton.jit
def _grad_preactivation(x_blk, weight, bias, h_seq, dy_blk, t0, rel, o_d, m_d, L, D, W: tl.constexpr,
                        SILU: tl.constexpr, HAS_BIAS: tl.constexpr, WITH_STATE: tl.constexpr):
    """dL/dz at block rows `rel` [BT] (zeros past the sequence end), fp32 [BT, BD]. With silu the
    pre-activation z is recomputed: cheaper than storing it (one more [T, D] write and read)."""
    m = (t0 + rel < L)[:, None] & m_d[None, :]
    dz = tl.load(dy_blk + rel[:, None] * D + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    if SILU:
        z = _preactivation(x_blk, weight, bias, h_seq, t0, rel, o_d, m_d, L, D, W, HAS_BIAS, WITH_STATE)
        sig = tl.sigmoid(z)
        dz = dz * sig * (1.0 + z * (1.0 - sig))
    return dz


@autotune(
    configs=[
        triton.Config({"BD": 64}, num_warps=4),
        triton.Config({"BD": 128}, num_warps=8),
        triton.Config({"BD": 32}, num_warps=2),
    ],
    key=["D", "W"],
)
@triton.jit
def short_conv_fwd_kernel(
    x, weight, bias, h0, y, ht, cu_seqlens, chunk_table, T, D,
    W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_n, i_t, bos, L = _sequence(cu_seqlens, chunk_table, T, IS_VARLEN)
    t0 = i_t * BT
    row0 = (bos + t0) * D  # int64: the only offset that can pass 2**31
    rel = tl.arange(0, BT)  # [BT] rows of the block
    o_d = tl.program_id(1) * BD + tl.arange(0, BD)  # [BD]
    m_d = o_d < D
    m_t = t0 + rel < L
    h_seq = h0
    if HAS_H0:
        h_seq += i_n.to(tl.int64) * D * (W - 1)
    z = _preactivation(x + row0, weight, bias, h_seq, t0, rel, o_d, m_d, L, D, W, HAS_BIAS, False)  # [BT, BD]
    if HAS_H0:
        if i_t == 0:
            z += _state_part(weight, h_seq, rel, o_d, m_d, W)
    if SILU:
        z = z * tl.sigmoid(z)
    p_y = y + row0 + rel[:, None] * D + o_d[None, :]
    tl.store(p_y, z.to(y.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])
    if STORE_FINAL:
        ht_seq = ht + i_n.to(tl.int64) * D * (W - 1)
        # The sequence's last W-1 inputs go to slots k = t - (L - (W-1)), oldest first.
        for k in tl.static_range(W - 1):
            t_k = L - (W - 1) + k
            if t_k >= 0:
                if t_k // BT == i_t:
                    x_k = tl.load(x + (bos + t_k) * D + o_d, mask=m_d, other=0.0).to(tl.float32)
                    tl.store(ht_seq + o_d * (W - 1) + k, x_k, mask=m_d)
            elif i_t == 0:
                # Older than the sequence: shifted in from the old state, or zeros.
                old = tl.zeros([BD], dtype=tl.float32)
                if HAS_H0:
                    old = tl.load(h_seq + o_d * (W - 1) + (t_k + W - 1), mask=m_d, other=0.0).to(tl.float32)
                tl.store(ht_seq + o_d * (W - 1) + k, old, mask=m_d)


@triton.jit
def _bwd_tile(x, weight, bias, h_seq, dy, dht_seq, dx, bos, t0, L, D, rel, o_w, o_d, m_d, dw_acc, db_acc,
              W: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DHT: tl.constexpr,
              WITH_STATE: tl.constexpr):
    """One tile of BT rows: stores dx, adds to the dweight/dbias sums, returns them and dz [BT, BD]."""
    row0 = (bos + t0) * D
    m_t = t0 + rel < L
    dz_own = _grad_preactivation(x + row0, weight, bias, h_seq, dy + row0, t0, rel, o_d, m_d, L, D,
                                 W, SILU, HAS_BIAS, WITH_STATE)  # [BT, BD]
    for w in tl.static_range(W):
        xs = _load_x(x + row0, t0, rel + (w - (W - 1)), o_d, m_d, L, D)  # [BT, BD]
        if WITH_STATE:
            xs += _load_state(h_seq, t0 + rel + (w - (W - 1)), o_d, m_d, W)
        dw_acc += tl.where(o_w[:, None] == w, tl.sum(dz_own * xs, axis=0)[None, :], 0.0)
    db_acc += tl.sum(dz_own, axis=0)

    # dx_t = sum_s weight[:, W-1-s] * dz_{t+s}, dz at the tile shifted by s (zero past the end). A loop,
    # not unrolled: unrolled, all shifted loads are hoisted together and their registers spill.
    dx_acc = tl.load(weight + o_d * W + (W - 1), mask=m_d, other=0.0).to(tl.float32)[None, :] * dz_own
    for s in tl.range(1, W, loop_unroll_factor=1):
        dz = _grad_preactivation(x + row0, weight, bias, h_seq, dy + row0, t0, rel + s, o_d, m_d, L, D,
                                 W, SILU, HAS_BIAS, WITH_STATE)
        tap = tl.load(weight + o_d * W + (W - 1 - s), mask=m_d, other=0.0).to(tl.float32)  # [BD]
        dx_acc += tap[None, :] * dz
    if HAS_DHT:
        # The final state holds the last W-1 inputs: row t feeds slot k = t - (L - (W-1)) (clamped slot:
        # see `_load_state`). For a short sequence the rest goes to the initial state.
        k = t0 + rel - (L - (W - 1))  # [BT]
        p_dht = dht_seq + o_d[None, :] * (W - 1) + tl.maximum(k, 0)[:, None]
        dx_acc += tl.load(p_dht, mask=((k >= 0) & m_t)[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    p_dx = dx + row0 + rel[:, None] * D + o_d[None, :]
    tl.store(p_dx, dx_acc.to(dx.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])
    return dw_acc, db_acc, dz_own


@autotune(
    configs=[
        triton.Config({"BD": 128}, num_warps=4),
        triton.Config({"BD": 256}, num_warps=8),
        triton.Config({"BD": 64}, num_warps=2),
    ],
    key=["D", "W"],
)
@triton.jit
def short_conv_bwd_kernel(
    x, weight, bias, h0, dy, dht, dx, dw_part, db_part, dh0, cu_seqlens, chunk_table, T, D,
    W: tl.constexpr, WP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr,
    SILU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr, HAS_DHT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_n, i_c, bos, L = _sequence(cu_seqlens, chunk_table, T, IS_VARLEN)
    if IS_VARLEN:
        i_p = tl.program_id(0)
    else:
        i_p = i_n * tl.num_programs(0) + i_c  # row of this program in the partial sums
    rel = tl.arange(0, BT)  # [BT]
    o_w = tl.arange(0, WP)  # [WP] taps (W padded to a power of two)
    o_d = tl.program_id(1) * BD + tl.arange(0, BD)  # [BD]
    m_d = o_d < D
    h_seq = h0
    if HAS_H0:
        h_seq += i_n.to(tl.int64) * D * (W - 1)
    dht_seq = dht
    if HAS_DHT:
        dht_seq += i_n.to(tl.int64) * D * (W - 1)
    dw_acc = tl.zeros([WP, BD], dtype=tl.float32)  # row w: sum_t dz_t * x_{t-(W-1)+w}
    db_acc = tl.zeros([BD], dtype=tl.float32)
    t_start = i_c * BC
    if HAS_H0:
        if i_c == 0:
            # The first tile, peeled off: the only one that reads the state, and the one that holds
            # the outputs reading it (BT >= W-1).
            t_start = BT
            dz_first = tl.zeros([BT, BD], dtype=tl.float32)
            if L > 0:
                dw_acc, db_acc, dz_first = _bwd_tile(
                    x, weight, bias, h_seq, dy, dht_seq, dx, bos, 0, L, D, rel, o_w, o_d, m_d, dw_acc, db_acc,
                    W, SILU, HAS_BIAS, HAS_DHT, True,
                )
            dh0_seq = dh0 + i_n.to(tl.int64) * D * (W - 1)
            for j in tl.static_range(W - 1):
                # State slot j sits at position j-(W-1): tap j-t of output t reads it, for t <= j.
                p_w = weight + o_d[None, :] * W + tl.maximum(j - rel, 0)[:, None]
                m_w = ((rel <= j) & (rel < L))[:, None] & m_d[None, :]
                g = tl.sum(tl.load(p_w, mask=m_w, other=0.0).to(tl.float32) * dz_first, axis=0)  # [BD]
                if HAS_DHT:
                    if L <= j:
                        # A sequence shorter than W-1 passes slot j on to final slot j - L.
                        g += tl.load(dht_seq + o_d * (W - 1) + (j - L), mask=m_d, other=0.0).to(tl.float32)
                tl.store(dh0_seq + o_d * (W - 1) + j, g, mask=m_d)
    for t0 in range(t_start, tl.minimum(i_c * BC + BC, L), BT):
        dw_acc, db_acc, _ = _bwd_tile(
            x, weight, bias, h_seq, dy, dht_seq, dx, bos, t0, L, D, rel, o_w, o_d, m_d, dw_acc, db_acc,
            W, SILU, HAS_BIAS, HAS_DHT, False,
        )

    # Per-program partial sums, reduced on the host (deterministic, unlike atomics).
    p_dw = dw_part + (i_p.to(tl.int64) * W + o_w[:, None]) * D + o_d[None, :]
    tl.store(p_dw, dw_acc, mask=(o_w < W)[:, None] & m_d[None, :])
    if HAS_BIAS:
        tl.store(db_part + i_p.to(tl.int64) * D + o_d, db_acc, mask=m_d)


@autotune(
    configs=[
        triton.Config({"BD": 256}, num_warps=4),
        triton.Config({"BD": 128}, num_warps=4),
        triton.Config({"BD": 512}, num_warps=4),
    ],
    key=["D", "W"],
)
@triton.jit
def short_conv_decode_kernel(
    x, weight, bias, h0, y, ht, D,
    W: tl.constexpr, BD: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_FINAL: tl.constexpr,
):
    """One token per sequence with a state: y from the state and x, and the state shifted by one."""
    i_d, i_b = tl.program_id(0), tl.program_id(1)
    o_d = i_d * BD + tl.arange(0, BD)  # [BD]
    m_d = o_d < D
    x_t = tl.load(x + i_b.to(tl.int64) * D + o_d, mask=m_d, other=0.0).to(tl.float32)  # [BD]
    z = tl.load(weight + o_d * W + (W - 1), mask=m_d, other=0.0).to(tl.float32) * x_t
    if HAS_BIAS:
        z += tl.load(bias + o_d, mask=m_d, other=0.0).to(tl.float32)
    p_state = i_b.to(tl.int64) * D * (W - 1) + o_d * (W - 1)  # [BD]
    for j in tl.static_range(W - 1):
        s_j = tl.load(h0 + p_state + j, mask=m_d, other=0.0).to(tl.float32)
        z += tl.load(weight + o_d * W + j, mask=m_d, other=0.0).to(tl.float32) * s_j
        if STORE_FINAL:
            if j > 0:
                tl.store(ht + p_state + (j - 1), s_j, mask=m_d)
    if STORE_FINAL:
        tl.store(ht + p_state + (W - 2), x_t, mask=m_d)
    if SILU:
        z = z * tl.sigmoid(z)
    tl.store(y + i_b.to(tl.int64) * D + o_d, z.to(y.dtype.element_ty), mask=m_d)


def _block_t(rows: int, W: int) -> int:
    # The state passes read the first W-1 outputs from one tile, so a tile must hold them.
    return max(rows, triton.next_power_of_2(W))


def _blocks(x, cu_seqlens, rows):
    """(programs along dim 0, programs along dim 2, program table or None) for programs of `rows` rows.
    Every sequence, empty ones included, gets a program (it writes the sequence's state)."""
    B, T, _ = x.shape
    if cu_seqlens is None:
        return max(1, triton.cdiv(T, rows)), B, None
    lens = cu_seqlens[1:] - cu_seqlens[:-1]  # [N]
    nblocks = ((lens + rows - 1) // rows).clamp(min=1)
    total = int(nblocks.sum())
    seq = torch.repeat_interleave(torch.arange(lens.numel(), device=x.device), nblocks, output_size=total)
    first = torch.repeat_interleave(torch.cumsum(nblocks, 0) - nblocks, nblocks, output_size=total)
    block = torch.arange(total, device=x.device) - first
    return total, 1, torch.stack([seq, block], 1).to(torch.int32).contiguous()  # [programs, 2]


def _num_sequences(x, cu_seqlens):
    return x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1


def _maybe_contiguous(t):
    return None if t is None else t.contiguous()


def short_conv_fwd(x, weight, bias, initial_state, cu_seqlens, activation, output_final_state):
    """y [B, T, D] in the dtype of x, and the final state fp32 [N, D, W-1] (or None)."""
    B, T, D = x.shape
    W = weight.shape[1]
    N = _num_sequences(x, cu_seqlens)
    x, weight, bias = x.contiguous(), weight.contiguous(), _maybe_contiguous(bias)
    h0 = _maybe_contiguous(initial_state) if W > 1 else None
    y = torch.empty_like(x)
    ht = torch.empty(N, D, W - 1, dtype=torch.float32, device=x.device) if output_final_state else None
    BT = _block_t(FWD_BLOCK_T, W)
    n_t, n_b, table = _blocks(x, cu_seqlens, BT)
    short_conv_fwd_kernel[lambda meta: (n_t, triton.cdiv(D, meta["BD"]), n_b)](
        x, weight, bias, h0, y, ht, cu_seqlens, table, T, D,
        W=W, BT=BT, SILU=activation == "silu", HAS_BIAS=bias is not None, HAS_H0=h0 is not None,
        STORE_FINAL=output_final_state and W > 1, IS_VARLEN=cu_seqlens is not None,
    )
    return y, ht


def short_conv_decode(x, weight, bias, initial_state, cu_seqlens, activation, output_final_state):
    """One step for x [B, 1, D] with a state [B, D, W-1]: y [B, 1, D] and the shifted state (or None)."""
    B, _, D = x.shape
    W = weight.shape[1]
    if W == 1:
        return short_conv_fwd(x, weight, bias, initial_state, cu_seqlens, activation, output_final_state)
    x, weight, bias, h0 = x.contiguous(), weight.contiguous(), _maybe_contiguous(bias), initial_state.contiguous()
    y = torch.empty_like(x)
    ht = torch.empty(B, D, W - 1, dtype=torch.float32, device=x.device) if output_final_state else None
    short_conv_decode_kernel[lambda meta: (triton.cdiv(D, meta["BD"]), B)](
        x, weight, bias, h0, y, ht, D,
        W=W, SILU=activation == "silu", HAS_BIAS=bias is not None, STORE_FINAL=output_final_state,
    )
    return y, ht


def short_conv_bwd(x, weight, bias, initial_state, cu_seqlens, activation, dy, dht):
    """Gradients (dx, dweight, dbias, dinitial_state), each in its input's dtype (None for absent inputs)."""
    B, T, D = x.shape
    W = weight.shape[1]
    N = _num_sequences(x, cu_seqlens)
    x, weight, bias, dy = x.contiguous(), weight.contiguous(), _maybe_contiguous(bias), dy.contiguous()
    h0 = _maybe_contiguous(initial_state) if W > 1 else None
    dht = _maybe_contiguous(dht) if W > 1 else None
    BT = _block_t(BWD_BLOCK_T, W)
    BC = max(BWD_CHUNK, BT)
    n_t, n_b, table = _blocks(x, cu_seqlens, BC)
    dx = torch.empty_like(x)
    dw_part = torch.empty(n_t * n_b, W, D, dtype=torch.float32, device=x.device)
    db_part = torch.empty(n_t * n_b, D, dtype=torch.float32, device=x.device) if bias is not None else None
    dh0 = torch.empty(N, D, W - 1, dtype=torch.float32, device=x.device) if h0 is not None else None
    short_conv_bwd_kernel[lambda meta: (n_t, triton.cdiv(D, meta["BD"]), n_b)](
        x, weight, bias, h0, dy, dht, dx, dw_part, db_part, dh0, cu_seqlens, table, T, D,
        W=W, WP=triton.next_power_of_2(W), BT=BT, BC=BC, SILU=activation == "silu", HAS_BIAS=bias is not None,
        HAS_H0=h0 is not None, HAS_DHT=dht is not None, IS_VARLEN=cu_seqlens is not None,
    )
    dweight = dw_part.sum(0).T.to(weight.dtype)  # [D, W]
    dbias = db_part.sum(0).to(bias.dtype) if bias is not None else None
    if initial_state is not None and dh0 is None:
        dh0 = torch.zeros_like(initial_state)  # W == 1: the state is empty
    dh0 = dh0.to(initial_state.dtype) if dh0 is not None else None
    return dx, dweight, dbias, dh0


def _register_cases():
    """Every feature on (bias, state, silu, final state, varlen), bf16 and fp32 inputs, W = 4."""
    common = {"W": 4, "SILU": True, "HAS_BIAS": True, "HAS_H0": True, "IS_VARLEN": True}
    for dtype in ("bf16", "fp32"):
        p = "*" + dtype
        fwd = short_conv_fwd_kernel.default_config
        register(CompileCase(
            name=f"short_conv_fwd_kernel[{dtype},BT={FWD_BLOCK_T},BD={fwd.kwargs['BD']}]",
            fn=short_conv_fwd_kernel.fn,
            signature={
                "x": p, "weight": p, "bias": p, "h0": "*fp32", "y": p, "ht": "*fp32", "cu_seqlens": "*i32",
                "chunk_table": "*i32", "T": "i32", "D": "i32", "W": "constexpr", "BT": "constexpr",
                "BD": "constexpr", "SILU": "constexpr", "HAS_BIAS": "constexpr", "HAS_H0": "constexpr",
                "STORE_FINAL": "constexpr", "IS_VARLEN": "constexpr",
            },
            constexprs={**common, "BT": FWD_BLOCK_T, "BD": fwd.kwargs["BD"], "STORE_FINAL": True},
            num_warps=fwd.num_warps, num_stages=fwd.num_stages,
        ))
        bwd = short_conv_bwd_kernel.default_config
        register(CompileCase(
            name=f"short_conv_bwd_kernel[{dtype},BT={BWD_BLOCK_T},BC={BWD_CHUNK},BD={bwd.kwargs['BD']}]",
            fn=short_conv_bwd_kernel.fn,
            signature={
                "x": p, "weight": p, "bias": p, "h0": "*fp32", "dy": p, "dht": "*fp32", "dx": p,
                "dw_part": "*fp32", "db_part": "*fp32", "dh0": "*fp32", "cu_seqlens": "*i32",
                "chunk_table": "*i32", "T": "i32", "D": "i32", "W": "constexpr", "WP": "constexpr",
                "BT": "constexpr", "BC": "constexpr", "BD": "constexpr", "SILU": "constexpr",
                "HAS_BIAS": "constexpr", "HAS_H0": "constexpr", "HAS_DHT": "constexpr", "IS_VARLEN": "constexpr",
            },
            constexprs={**common, "WP": 4, "BT": BWD_BLOCK_T, "BC": BWD_CHUNK, "BD": bwd.kwargs["BD"], "HAS_DHT": True},
            num_warps=bwd.num_warps, num_stages=bwd.num_stages,
        ))
        dec = short_conv_decode_kernel.default_config
        register(CompileCase(
            name=f"short_conv_decode_kernel[{dtype},BD={dec.kwargs['BD']}]",
            fn=short_conv_decode_kernel.fn,
            signature={
                "x": p, "weight": p, "bias": p, "h0": "*fp32", "y": p, "ht": "*fp32", "D": "i32",
                "W": "constexpr", "BD": "constexpr", "SILU": "constexpr", "HAS_BIAS": "constexpr",
                "STORE_FINAL": "constexpr",
            },
            constexprs={"W": 4, "BD": dec.kwargs["BD"], "SILU": True, "HAS_BIAS": True, "STORE_FINAL": True},
            num_warps=dec.num_warps, num_stages=dec.num_stages,
        ))


_register_cases()
