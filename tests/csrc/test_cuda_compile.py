"""The CUDA sources compile with nvcc for sm_80 and sm_90 with zero register spills (no GPU needed).

They are not built into the extension here (torch is CPU-only); this keeps them compiling. Their
arithmetic is the shared header that the CPU extension's tests check numerically.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ipl_layers.kernels.common.aot import parse_ptxas_log

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = sorted((CSRC / "cuda").glob("*.cu"))
ARCHS = (80, 90)

needs_nvcc = pytest.mark.skipif(
    shutil.which("nvcc") is None, reason="nvcc not on PATH: the CUDA sources cannot be compile-checked here"
)


def test_cuda_sources_exist():
    assert SOURCES, f"no .cu files under {CSRC / 'cuda'}"


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm_{a}" for a in ARCHS])
@pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
def test_cuda_source_compiles_without_spills(source, arch, tmp_path):
    cmd = ["nvcc", "-cubin", f"-arch=sm_{arch}", "--resource-usage", "-Werror", "all-warnings",
           "-I", str(CSRC), "-o", str(tmp_path / "out.cubin"), str(source)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    log = run.stdout + run.stderr
    assert run.returncode == 0, f"{' '.join(cmd)} failed:\n{log}"
    kernels = re.split(r"(?=ptxas info\s*: Compiling entry function)", log)[1:]  # one report per kernel
    assert kernels, f"no kernel in {source.name}:\n{log}"
    for report in kernels:
        usage = parse_ptxas_log(report)
        assert usage["spill_store_bytes"] == 0 and usage["spill_load_bytes"] == 0, f"spills:\n{report}"
        assert 0 < usage["regs"] <= 255, report
