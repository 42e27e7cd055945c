"""Cumulative sums of the log-decay along time for the chunked `linear_attention` kernels.

Both kernels see the decay as C channels per token (C = H for a scalar decay, H * K per key):

* `linear_attn_chunk_cumsum_kernel`: b = inclusive cumsum of g inside each chunk (fp32). Chunk-local sums
  stay small (|b| <= BT * |g|), so differences b_i - b_j inside a chunk keep their fp32 precision.
* `linear_attn_chunk_dg_kernel`: the decay gradient, a reverse cumsum over each whole sequence,

      dg_t = sum_{s >= t} x_s + f,    x_s = sum (q_s * dq_s - k_s * dk_s),    f = sum (S_T * dS_T)

  (x summed over the key channels of a head for a scalar decay, f over the state entries of the channel).
"""

import math

import torch
import triton
import triton.language as tl

from ipl_layers.kernels.common.autotune import autotune
from ipl_layers.kernels.linear_attn.chunk_config import CONFIGS, register_default
from ipl_layers.kernels.linear_attn.chunk_layout import MAX_CHUNK, ChunkLayout

# Channels per program: the scans along time of [64, 64] tiles take 150-255 registers, [64, 16] ~50.
CHANNEL_BLOCK = 16


@autotune(CONFIGS, key=["BT", "BD"])
@triton.jit
def linear_attn_chunk_cumsum_kernel(
    g,  # [B * T, C]
    gc,  # [B * T, C] fp32
    chunk_spans,  # [NT, 3]: first token, length, ends its sequence
    C,
    BT: tl.constexpr,
    BD: tl.constexpr,
):
    i_c, i_d = tl.program_id(0), tl.program_id(1)
    first = tl.load(chunk_spans + 3 * i_c)
    length = tl.load(chunk_spans + 3 * i_c + 1)
    if length <= 0:
        return
    o_t = tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    mask = (o_t < length)[:, None] & (o_d < C)[None, :]
    offsets = (first + o_t)[:, None] * C + o_d[None, :]  # [BT, BD]
    x = tl.load(g + offsets, mask=mask, other=0).to(tl.float32)
    tl.store(gc + offsets, tl.cumsum(x, axis=0), mask=mask)


@autotune(CONFIGS, key=["BT", "BD"])
@triton.jit
def linear_attn_chunk_dg_kernel(
    x,  # [B * T, C] fp32: q * dq - k * dk summed per channel
    final,  # [N, C] fp32: sum (S_T * dS_T) per channel, or None
    dg,  # [B * T, C]
    seq_offsets,  # [N + 1]
    C,
    BT: tl.constexpr,
    BD: tl.constexpr,
):
    i_d, i_n = tl.program_id(0), tl.program_id(1)
    bos = tl.load(seq_offsets + i_n)
    eos = tl.load(seq_offsets + i_n + 1)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < C
    carry = tl.zeros([BD], dtype=tl.float32)  # sum of x over the tokens after the current block
    if final is not None:
        carry = tl.load(final + i_n * C + o_d, mask=m_d, other=0)
    # blocks aligned to the sequence end, walked backwards
    for i in range(tl.cdiv(eos - bos, BT)):
        tok = eos - (i + 1) * BT + tl.arange(0, BT)  # [BT]
        mask = (tok >= bos)[:, None] & m_d[None, :]
        offsets = tok[:, None] * C + o_d[None, :]
        b_x = tl.load(x + offsets, mask=mask, other=0)
        b_dg = tl.cumsum(b_x, axis=0, reverse=True) + carry[None, :]
        tl.store(dg + offsets, b_dg.to(dg.dtype.element_ty), mask=mask)
        carry += tl.sum(b_x, axis=0)


def linear_attn_chunk_cumsum(g: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    """Chunk-local inclusive cumsum of g ([B, T, H] or [B, T, H, K]), fp32, same shape."""
    g = g.contiguous()
    C = math.prod(g.shape[2:])  # channels per token (g[0, 0] does not exist when T = 0)
    gc = torch.empty(g.shape, device=g.device, dtype=torch.float32)
    grid = (layout.NT, triton.cdiv(C, CHANNEL_BLOCK))
    linear_attn_chunk_cumsum_kernel[grid](g, gc, layout.chunk_spans, C, BT=layout.BT, BD=CHANNEL_BLOCK)
    return gc


def linear_attn_chunk_dg(x: torch.Tensor, final, dtype: torch.dtype, layout: ChunkLayout) -> torch.Tensor:
    """dg from x (fp32, the shape of g) and the final-state term ([N, ...] fp32 or None), in `dtype`."""
    C = math.prod(x.shape[2:])
    dg = torch.empty(x.shape, device=x.device, dtype=dtype)
    final = final.contiguous() if final is not None else None
    grid = (triton.cdiv(C, CHANNEL_BLOCK), layout.N)
    linear_attn_chunk_dg_kernel[grid](x, final, dg, layout.seq_offsets, C, BT=MAX_CHUNK, BD=CHANNEL_BLOCK)
    return dg


def _register_compile_cases():
    for dtype in ("bf16", "fp32"):
        blocks = {"BT": MAX_CHUNK, "BD": CHANNEL_BLOCK}
        register_default(
            linear_attn_chunk_cumsum_kernel, f"{dtype}",
            {"g": f"*{dtype}", "gc": "*fp32", "chunk_spans": "*i64", "C": "i32"}, blocks,
        )
        register_default(
            linear_attn_chunk_dg_kernel, f"{dtype}",
            {"x": "*fp32", "final": "*fp32", "dg": f"*{dtype}", "seq_offsets": "*i64", "C": "i32"}, blocks,
        )


_register_compile_cases()
