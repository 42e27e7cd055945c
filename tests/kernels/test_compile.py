"""Ahead-of-time compile check: every registered kernel config builds for sm_80 and sm_90 with zero
register spills and shared memory within the architecture's limit.

The reader itself is proven on toy kernels defined here (kept out of the global registry): one that
must spill, and `tl.dot` kernels whose shared memory must hold their operand tiles. Compiles run once
per session (cached) in child processes; see `kernels/common/aot.py`.
"""

import functools
import traceback

import pytest
import triton
import triton.language as tl

from ipl_layers.kernels.common import aot, registry
from ipl_layers.kernels.common.registry import CompileCase

WORKERS = 2


@triton.jit
def toy_center_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    # Every loaded value stays live across the max: BLOCK = 16384 on one warp is 512 fp32 per thread,
    # twice the 255-register ceiling, so ptxas must spill.
    offs = tl.arange(0, BLOCK)  # [BLOCK]
    x = tl.load(x_ptr + offs)
    tl.store(y_ptr + offs, x - tl.max(x, axis=0))


@triton.jit
def toy_dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])  # [M, K]
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])  # [K, N]
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], tl.dot(a, b))  # [M, N]


DOT_SIGNATURE = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32", "M": "constexpr", "N": "constexpr",
                 "K": "constexpr"}
SPILLING = CompileCase("toy_center_kernel[BLOCK=16384,w=1]", toy_center_kernel,
                       {"x_ptr": "*fp32", "y_ptr": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 16384}, num_warps=1)
DOTS = {K: CompileCase(f"toy_dot_kernel[64x64x{K}]", toy_dot_kernel, DOT_SIGNATURE, {"M": 64, "N": 64, "K": K})
        for K in (64, 128)}
# The signature lacks `c_ptr`: the frontend rejects it, which the report must carry instead of raising.
BROKEN = CompileCase("toy_dot_kernel[broken]", toy_dot_kernel,
                     {k: v for k, v in DOT_SIGNATURE.items() if k != "c_ptr"}, {"M": 64, "N": 64, "K": 64})



def _load_registry():
    """All registered cases, or the import error: a broken kernel module fails the registry test below
    instead of hiding this file's other tests behind a collection error."""
    try:
        return registry.load_all(), ""
    except Exception:
        return [], traceback.format_exc()


REGISTERED, REGISTRY_ERROR = _load_registry()


@functools.lru_cache(maxsize=None)
def toy_results():
    results = aot.compile_cases([SPILLING, *DOTS.values(), BROKEN], workers=WORKERS)
    return {(r.name, r.arch): r for r in results}


@functools.lru_cache(maxsize=None)
def registered_results():
    return {(r.name, r.arch): r for r in aot.compile_cases(REGISTERED, workers=WORKERS)}


@pytest.mark.parametrize(
    "name, arch",
    [pytest.param(c.name, arch, id=f"{c.name}-sm_{arch}") for c in REGISTERED for arch in aot.ARCHS]
    or [pytest.param(None, None, id="registry-empty")],
)
def test_registered_case_compiles_without_spills_within_smem(name, arch):
    assert not REGISTRY_ERROR, f"importing the kernel modules failed:\n{REGISTRY_ERROR}"
    assert name is not None, (
        "no compile cases registered: every kernel module must call registry.register(CompileCase(...)) at "
        "import for its default configs (bf16 and fp32)"
    )
    r = registered_results()[(name, arch)]
    assert not r.problems(), (
        f"{name} sm_{arch}: {'; '.join(r.problems())} "
        f"(regs {r.regs}, stack {r.stack_bytes} B, smem {r.smem_bytes} B, {r.num_warps} warps)"
    )


@pytest.mark.parametrize("arch", aot.ARCHS)
def test_spills_are_detected(arch):
    r = toy_results()[(SPILLING.name, arch)]
    assert not r.error, r.error
    assert r.spill_store_bytes > 0 and r.spill_load_bytes > 0 and r.stack_bytes > 0, r
    assert any("spills" in p for p in r.problems()), r.problems()


@pytest.mark.parametrize("arch", aot.ARCHS)
def test_dot_shared_memory_holds_operand_tiles(arch):
    small, large = (toy_results()[(DOTS[K].name, arch)] for K in (64, 128))
    for K, r in ((64, small), (128, large)):
        assert not r.error, r.error
        operand_bytes = (64 * K + K * 64) * 2  # bf16 A [64, K] and B [K, 64] are staged through shared memory
        assert r.smem_bytes >= operand_bytes, f"K={K}: smem {r.smem_bytes} B < operand tiles {operand_bytes} B"
        assert r.spill_bytes == 0 and r.regs > 0 and r.occupancy_warps > 0, r
        assert not r.problems(), r.problems()
    assert large.smem_bytes > small.smem_bytes, (small.smem_bytes, large.smem_bytes)


@pytest.mark.parametrize("arch", aot.ARCHS)
def test_failed_compile_is_reported_not_raised(arch):
    r = toy_results()[(BROKEN.name, arch)]
    assert r.error and r.regs is None and r.smem_bytes is None, r
    assert r.problems() == [f"compile failed: {r.error}"]


def test_smem_over_limit_is_a_problem_and_cannot_launch():
    for arch, limit in aot.SMEM_LIMIT.items():
        fields = dict(name="x", arch=arch, num_warps=4, num_stages=2, regs=64, stack_bytes=0, spill_store_bytes=0,
                      spill_load_bytes=0, smem_limit_bytes=limit)
        at_limit, over = (aot.CompileResult(**fields, smem_bytes=s, occupancy_warps=aot.occupancy_warps(64, s, 4, arch))
                          for s in (limit, limit + 1))
        assert at_limit.problems() == [] and at_limit.occupancy_warps == 4
        assert over.problems() == [f"shared memory {limit + 1} B > sm_{arch} limit {limit} B"]
        assert over.occupancy_warps == 0


def test_occupancy_estimate():
    # 128 regs x 32 lanes = 4096 per warp; 65536 / (4096 x 4 warps) = 4 blocks = 16 warps.
    assert aot.occupancy_warps(128, 0, 4, 90) == 16
    # 32 regs: register file allows 16 blocks of 4 warps, the 64 warp slots allow 16: 64 warps.
    assert aot.occupancy_warps(32, 0, 4, 90) == 64
    # 100 KiB + 1 KiB reserved per block: one block fits in sm_80's 164 KiB, two in sm_90's 228 KiB.
    assert aot.occupancy_warps(32, 100 * 1024, 4, 80) == 4
    assert aot.occupancy_warps(32, 100 * 1024, 4, 90) == 8
    # 255 regs round up to 8192 per warp: 8 warps fit in the register file.
    assert aot.occupancy_warps(255, 0, 1, 80) == 8


def test_ptxas_log_parse():
    log = (
        "ptxas info    : Compiling entry function 'k' for 'sm_80'\n"
        "ptxas info    : Function properties for k\n"
        "    24 bytes stack frame, 16 bytes spill stores, 8 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 392 bytes cmem[0]\n"
    )
    assert aot.parse_ptxas_log(log) == {"regs": 255, "stack_bytes": 24, "spill_store_bytes": 16, "spill_load_bytes": 8}
    with pytest.raises(RuntimeError, match="expected one ptxas resource report"):
        aot.parse_ptxas_log("ptxas info    : 0 bytes gmem\n")
