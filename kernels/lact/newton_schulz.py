"""Batched Newton-Schulz orthogonalisation (Muon) of `lact`'s weight updates: one program per matrix.

A program loads one [R, S] matrix (R <= S: the launcher transposes tall ones, as the map commutes with
transposition), scales it to unit Frobenius norm and runs the quintic steps X <- a X + (b A + c A A) X,
A = X X^T, with X and A held on chip the whole time: one HBM read and one write per matrix, where the
torch path (`ipl_layers/ops/lact_chunk.py: newton_schulz`) makes three batched matmuls per step, each a round
trip of [P, R, R] or [P, R, S] through memory. Accumulation is fp32; on a GPU fp32 `tl.dot` runs in TF32
(~1e-3 relative error per product, well inside what an orthogonalisation by a polynomial tolerates).

Tiles are padded to powers of two of at least 16 (`tl.dot`'s minimum); zero padding stays zero. The
largest tile is 64 x 64 (X, A and A A in registers without spills at 4 warps): LaCT's head dims and
hidden widths up to 64 — larger ones stay on the torch path.
"""

import torch
import triton
import triton.language as tl

from ipl_layers.kernels.common.registry import CompileCase, register
from ipl_layers.ops.lact_chunk import NS_COEFFICIENTS, NS_EPS

MAX_DIM = 64
NUM_WARPS = 4
if len(set(NS_COEFFICIENTS)) != 1:
    raise ImportError("lact_newton_schulz_kernel runs one (a, b, c) for every step; NS_COEFFICIENTS has a schedule")


@triton.jit
def lact_newton_schulz_kernel(
    g,  # [P, R, S]: the matrices, R <= S
    x,  # [P, R, S] fp32: their orthogonalisations
    R: tl.constexpr,
    S: tl.constexpr,
    BR: tl.constexpr,
    BS: tl.constexpr,
    A_COEF: tl.constexpr,
    B_COEF: tl.constexpr,
    C_COEF: tl.constexpr,
    STEPS: tl.constexpr,
    EPS: tl.constexpr,
):
    i_p = tl.program_id(0).to(tl.int64)
    o_r, o_s = tl.arange(0, BR), tl.arange(0, BS)
    m = (o_r < R)[:, None] & (o_s < S)[None, :]
    offs = i_p * R * S + o_r[:, None] * S + o_s[None, :]  # [BR, BS]
    X = tl.load(g + offs, mask=m, other=0.0).to(tl.float32)
    X = X / (tl.sqrt(tl.sum(tl.sum(X * X, axis=1), axis=0)) + EPS)
    for _ in tl.static_range(STEPS):
        A = tl.dot(X, tl.trans(X))  # [BR, BR]
        Bm = B_COEF * A + C_COEF * tl.dot(A, A)
        X = A_COEF * X + tl.dot(Bm, X)
    tl.store(x + offs, X, mask=m)


def _tile(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def lact_newton_schulz(G: torch.Tensor) -> torch.Tensor:
    """Muon's orthogonalisation of every matrix of G [P, R, S] (R, S <= 64): five steps of the quintic
    (3.4445, -4.7750, 2.0315) after scaling to unit Frobenius norm. Returns fp32 [P, R, S]."""
    if G.dim() != 3:
        raise ValueError(f"lact_newton_schulz: G: expected 3-D [P, R, S], got {G.dim()}-D with shape {list(G.shape)}")
    if max(G.shape[1:]) > MAX_DIM:
        raise ValueError(f"lact_newton_schulz: G: expected R, S <= {MAX_DIM}, got shape {list(G.shape)}")
    tall = G.shape[1] > G.shape[2]
    X = (G.mT if tall else G).contiguous()
    P, R, S = X.shape
    out = torch.empty(P, R, S, dtype=torch.float32, device=G.device)
    (a, b, c), steps = NS_COEFFICIENTS[0], len(NS_COEFFICIENTS)
    if P:
        lact_newton_schulz_kernel[(P,)](X, out, R=R, S=S, BR=_tile(R), BS=_tile(S), A_COEF=a, B_COEF=b, C_COEF=c,
                                        STEPS=steps, EPS=NS_EPS, num_warps=NUM_WARPS)
    return out.mT if tall else out


def _register_cases():
    """64 x 64 (LaCT's K = F = 64) and 32 x 64, bf16 and fp32 inputs."""
    (a, b, c), steps = NS_COEFFICIENTS[0], len(NS_COEFFICIENTS)
    for dtype in ("bf16", "fp32"):
        for R, S in ((64, 64), (32, 64)):
            register(CompileCase(
                name=f"lact_newton_schulz_kernel[{dtype},{R}x{S}]",
                fn=lact_newton_schulz_kernel,
                signature={"g": "*" + dtype, "x": "*fp32", "R": "constexpr", "S": "constexpr", "BR": "constexpr",
                           "BS": "constexpr", "A_COEF": "constexpr", "B_COEF": "constexpr", "C_COEF": "constexpr",
                           "STEPS": "constexpr", "EPS": "constexpr"},
                constexprs={"R": R, "S": S, "BR": R, "BS": S, "A_COEF": a, "B_COEF": b, "C_COEF": c, "STEPS": steps,
                            "EPS": NS_EPS},
                num_warps=NUM_WARPS,
            ))


_register_cases()
