"""Ahead-of-time compile check: every registered `CompileCase` built for sm_80 and sm_90 without a GPU.

Each case is compiled with `triton.compile` for a `GPUTarget` (no driver needed); ptxas reports registers,
stack frame and spill bytes in its log (`TRITON_DUMP_PTXAS_LOG=1`), and shared memory comes from the
compiled metadata. From those we estimate occupancy.

Compiles run in child processes, for three reasons: under the test suite `TRITON_INTERPRET=1` turns every
`@triton.jit` into an interpreted function that cannot be compiled, so a child re-imports the kernel's
module with the interpreter off; the child gets a private, empty `TRITON_CACHE_DIR` (a cache hit would skip
ptxas and its log, and stale entries would make reports irreproducible); and the knobs we set stay out of
the caller's process. A case is found in the child by its kernel's module and name, so kernels must be
defined at module level (registered or not: tests pass their own toy cases).
"""

import contextlib
import io
import json
import math
import os
import pickle
import re
import subprocess
import sys
import tempfile
import types
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

from ipl_layers.kernels.common.registry import CompileCase

ARCHS = (80, 90)
KIB = 1024
# Largest dynamic shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SMEM_LIMIT = {80: 163 * KIB, 90: 227 * KIB}
# Shared memory per SM, of which the runtime reserves 1 KiB per resident block.
SMEM_PER_SM = {80: 164 * KIB, 90: 228 * KIB}
SMEM_RESERVED_PER_BLOCK = 1 * KIB
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32

_REGS = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass(frozen=True)
class CompileResult:
    """What one (case, arch) compile costs. Numbers are None when the compile failed (`error` says why)."""

    name: str
    arch: int
    num_warps: int
    num_stages: int
    regs: Optional[int]  # per thread
    stack_bytes: Optional[int]  # per-thread stack frame (spills live there)
    spill_store_bytes: Optional[int]
    spill_load_bytes: Optional[int]
    smem_bytes: Optional[int]  # per block
    smem_limit_bytes: int
    occupancy_warps: Optional[int]  # resident warps per SM, limited by registers, shared memory, warp slots
    error: str = ""

    @property
    def spill_bytes(self) -> Optional[int]:
        if self.spill_store_bytes is None:
            return None
        return self.spill_store_bytes + self.spill_load_bytes

    @property
    def occupancy(self) -> Optional[float]:
        """Resident warps per SM as a fraction of the 64 warp slots."""
        return None if self.occupancy_warps is None else self.occupancy_warps / MAX_WARPS_PER_SM

    def problems(self) -> List[str]:
        """Why this case may not ship: a failed compile, register spills, or shared memory over the limit."""
        if self.error:
            return [f"compile failed: {self.error}"]
        found = []
        if self.spill_bytes:
            found.append(f"spills {self.spill_store_bytes} B stores / {self.spill_load_bytes} B loads")
        if self.smem_bytes > self.smem_limit_bytes:
            found.append(f"shared memory {self.smem_bytes} B > sm_{self.arch} limit {self.smem_limit_bytes} B")
        return found

    def to_dict(self) -> Dict[str, object]:
        return dict(asdict(self), spill_bytes=self.spill_bytes, occupancy=self.occupancy)


def occupancy_warps(regs: int, smem_bytes: int, num_warps: int, arch: int) -> int:
    """Resident warps per SM for a block of `num_warps` warps (0: the block cannot launch)."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = REGS_PER_SM // (regs_per_warp * num_warps)
    by_smem = SMEM_PER_SM[arch] // (smem_bytes + SMEM_RESERVED_PER_BLOCK)
    if smem_bytes > SMEM_LIMIT[arch]:
        by_smem = 0
    by_warps = MAX_WARPS_PER_SM // num_warps
    return min(by_regs, by_smem, by_warps, MAX_BLOCKS_PER_SM) * num_warps


def parse_ptxas_log(log: str) -> Dict[str, int]:
    """Registers, stack frame and spill bytes from a `ptxas -v` log of one entry function."""
    regs, frame = _REGS.findall(log), _FRAME.findall(log)
    if len(regs) != 1 or len(frame) != 1:
        raise RuntimeError(f"expected one ptxas resource report, found {len(regs)} register and {len(frame)} "
                           f"stack-frame lines in the log:\n{log}")
    stack, stores, loads = (int(x) for x in frame[0])
    return {"regs": int(regs[0]), "stack_bytes": stack, "spill_store_bytes": stores, "spill_load_bytes": loads}


def _python_function(fn):
    """The plain Python function under a JIT/interpreted function or an autotuner/heuristics wrapper."""
    while not isinstance(fn, types.FunctionType):
        fn = fn.fn
    return fn


def _job(case: CompileCase, arch: int) -> Dict[str, object]:
    py = _python_function(case.fn)
    return {
        "name": case.name,
        "arch": arch,
        "module": py.__module__,
        "file": py.__code__.co_filename,
        "qualname": py.__qualname__,
        "signature": dict(case.signature),
        "constexprs": dict(case.constexprs),
        "num_warps": case.num_warps,
        "num_stages": case.num_stages,
    }


def compile_cases(cases: Sequence[CompileCase], archs: Sequence[int] = ARCHS, workers: int = 1,
                  timeout_s: float = 1800.0) -> List[CompileResult]:
    """Compiles every case for every arch; results in the order (case, arch) of the arguments."""
    jobs = [_job(case, arch) for case in cases for arch in archs]
    if not jobs:
        return []
    workers = max(1, min(workers, len(jobs)))
    with tempfile.TemporaryDirectory(prefix="ipl-aot-") as tmp:
        procs = []
        for w in range(workers):
            job_path, out_path = os.path.join(tmp, f"jobs{w}.pkl"), os.path.join(tmp, f"out{w}.json")
            with open(job_path, "wb") as f:
                pickle.dump({"sys_path": [p for p in sys.path if isinstance(p, str)], "jobs": jobs[w::workers]}, f)
            procs.append((_spawn(job_path, out_path, os.path.join(tmp, f"cache{w}")), out_path))
        chunks = []
        try:
            for proc, out_path in procs:
                _, stderr = proc.communicate(timeout=timeout_s)
                if proc.returncode != 0:
                    raise RuntimeError(f"aot compile worker exited with {proc.returncode}:\n{stderr}")
                with open(out_path) as f:
                    chunks.append([CompileResult(**r) for r in json.load(f)])
        finally:
            for proc, _ in procs:  # after a timeout or a failed sibling: no orphan compiles
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    # Undo the round-robin split so results follow the job order.
    return [chunks[i % workers][i // workers] for i in range(len(jobs))]


def _spawn(job_path: str, out_path: str, cache_dir: str) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.update(
        TRITON_CACHE_DIR=cache_dir,
        TRITON_DUMP_PTXAS_LOG="1",
        TRITON_ALWAYS_COMPILE="1",  # identical cases in one batch still run ptxas, so each has its log
        TRITON_DEFAULT_FP_FUSION=env.get("TRITON_DEFAULT_FP_FUSION", "1"),  # Triton 3.9's runtime default
    )
    code = f"from ipl_layers.kernels.common import aot; aot._worker({job_path!r}, {out_path!r})"
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _worker(job_path: str, out_path: str):
    """Child-process entry: compiles the pickled jobs and writes their results as JSON."""
    with open(job_path, "rb") as f:
        batch = pickle.load(f)
    sys.path[:0] = [p for p in batch["sys_path"] if p not in sys.path]
    results = []
    for job in batch["jobs"]:
        try:
            results.append(_compile(job))
        except Exception as e:  # one broken kernel must not hide the report of the others
            results.append(_failed(job, f"{type(e).__name__}: {e}"[:2000]))
    with open(out_path, "w") as f:
        json.dump([asdict(r) for r in results], f)


def _load_jit_function(job):
    import importlib
    import importlib.util

    from triton.runtime.jit import JITFunction

    if job["module"] == "__main__":  # a script's kernel: load its file under another name, guard intact
        spec = importlib.util.spec_from_file_location("_ipl_aot_main", job["file"])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(job["module"])
    fn = module
    for part in job["qualname"].split("."):
        fn = getattr(fn, part)
    while not isinstance(fn, JITFunction):  # autotuner / heuristics wrappers hold the kernel in `.fn`
        fn = fn.fn
    return fn


def _compile(job) -> CompileResult:
    import triton
    from triton.backends.compiler import GPUTarget

    fn = _load_jit_function(job)
    # Torch allocations are 16-byte aligned and the launcher tells Triton so; hint the same here,
    # or the compile would miss the vectorized loads the kernel gets at run time.
    attrs = {(fn.arg_names.index(arg),): [["tt.divisibility", 16]]
             for arg, ty in job["signature"].items() if ty.startswith("*")}
    src = triton.compiler.ASTSource(fn=fn, signature=job["signature"], constexprs=job["constexprs"], attrs=attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # Triton prints the ptxas log with print()
        compiled = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32),
                                  options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]})
    usage = parse_ptxas_log(log.getvalue())
    smem = int(compiled.metadata.shared)
    return CompileResult(
        name=job["name"], arch=job["arch"], num_warps=job["num_warps"], num_stages=job["num_stages"],
        smem_bytes=smem, smem_limit_bytes=SMEM_LIMIT[job["arch"]],
        occupancy_warps=occupancy_warps(usage["regs"], smem, job["num_warps"], job["arch"]), **usage,
    )


def _failed(job, error: str) -> CompileResult:
    return CompileResult(
        name=job["name"], arch=job["arch"], num_warps=job["num_warps"], num_stages=job["num_stages"], regs=None,
        stack_bytes=None, spill_store_bytes=None, spill_load_bytes=None, smem_bytes=None,
        smem_limit_bytes=SMEM_LIMIT[job["arch"]], occupancy_warps=None, error=error,
    )
