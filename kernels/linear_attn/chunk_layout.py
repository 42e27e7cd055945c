"""Where the chunks lie, and the block sizes shared by the chunked `linear_attention` kernels.

Every chunked kernel sees the tokens as one flat axis [B * T]; a batch without `cu_seqlens` is the packed
batch with offsets 0, T, 2T, ... Chunks restart at each sequence start, so a sequence of length L owns
cdiv(L, BT) consecutive chunks (the last one possibly partial) and an empty sequence owns none.

The layout is built on the device without a host sync: the number of chunk slots is bounded from the
shapes alone (cdiv(T, BT) + N with `cu_seqlens`), and the spare slots get length 0, so their programs
return at once.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import triton

# Forms of the log-decay g, the constexpr GATE of every kernel (the kernels test the literal ints).
GATE_NONE, GATE_SCALAR, GATE_KEY = 0, 1, 2
GATE_NAMES = {GATE_NONE: "none", GATE_SCALAR: "scalar", GATE_KEY: "key"}

# Largest chunk and feature blocks: BT = 64 with 64-wide feature blocks fits 4 warps without spills on
# sm_80/sm_90; BT = 128 spills.
MAX_CHUNK = 64
MAX_FEATURE_BLOCK = 64
# Feature block of the kernels that hold a state block or several [BT, BT]/[BT, BK] accumulators beside
# their dot operands, where 64 spills on sm_80: the state scans (K and V), dv (V) and dq/dk (K and V).
NARROW_BLOCK = 32
# The per-key decay splits a chunk into sub-chunks of BC rows (see chunk_intra.py); tl.dot needs >= 16.
SUB_CHUNK = 16
# Key block of the sub-chunk kernels, whose [BC, BC, BK] broadcasts must stay in registers.
INTRA_KEY_BLOCK = 32


@dataclass(frozen=True)
class ChunkLayout:
    seq_offsets: torch.Tensor  # [N + 1] int64, first token of each sequence in the flat token axis
    chunk_offsets: torch.Tensor  # [N + 1] int64, first chunk slot of each sequence
    # [NT, 3] int64 per chunk slot: first token, length (0 for a spare slot), 1 if it ends its sequence
    chunk_spans: torch.Tensor
    N: int  # number of sequences
    NT: int  # number of chunk slots (an upper bound on the chunks with `cu_seqlens`)
    BT: int  # chunk length


def gate_form(g: Optional[torch.Tensor]) -> int:
    if g is None:
        return GATE_NONE
    return GATE_SCALAR if g.dim() == 3 else GATE_KEY


def chunk_block(chunk_size: int) -> int:
    """The kernels' chunk length: chunk_size rounded up to a power of two, within [16, MAX_CHUNK]."""
    return min(MAX_CHUNK, max(16, triton.next_power_of_2(chunk_size)))


def feature_block(D: int, cap: int = MAX_FEATURE_BLOCK) -> int:
    """Block over a head dimension: all of it up to `cap`, and at least 16 for tl.dot."""
    return min(cap, max(16, triton.next_power_of_2(D)))


def chunk_layout(B: int, T: int, cu_seqlens: Optional[torch.Tensor], BT: int, device) -> ChunkLayout:
    if cu_seqlens is None:
        seq_offsets = torch.arange(B + 1, device=device, dtype=torch.int64) * T
        NT = B * triton.cdiv(T, BT)
    else:
        seq_offsets = cu_seqlens.to(device=device, dtype=torch.int64)
        # each sequence adds at most one partial chunk to the cdiv(T, BT) full ones
        NT = triton.cdiv(T, BT) + seq_offsets.numel() - 1
    N = seq_offsets.numel() - 1
    NT = max(NT, 1)
    counts = (seq_offsets[1:] - seq_offsets[:-1] + BT - 1) // BT  # [N]
    chunk_offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])  # [N + 1]
    slots = torch.arange(NT, device=device, dtype=torch.int64)
    # right=True skips empty sequences (equal offsets); spare slots land past the last sequence
    seq = (torch.searchsorted(chunk_offsets, slots, right=True) - 1).clamp(max=N - 1)  # [NT]
    first = seq_offsets[seq] + (slots - chunk_offsets[seq]) * BT
    length = (seq_offsets[seq + 1] - first).clamp(0, BT)
    ends = ((first + length == seq_offsets[seq + 1]) & (length > 0)).long()
    chunk_spans = torch.stack([first, length, ends], dim=1).contiguous()  # [NT, 3]
    return ChunkLayout(seq_offsets, chunk_offsets, chunk_spans, N, NT, BT)
