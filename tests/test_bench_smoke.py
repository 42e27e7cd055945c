"""The benchmark harness behind `make demo` runs end to end (tiny shape, no timing claims)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_runs_and_writes_results(tmp_path):
    out = tmp_path / "smoke"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "bench/run.py", "--T", "64", "--H", "2", "--D", "16", "--min-run-time", "0.01", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = (tmp_path / "smoke.md").read_text()
    for case in ("linear_attention:plain", "linear_attention:scalar_decay", "linear_attention:key_decay"):
        assert case in table and case in done.stdout
    rows = json.loads((tmp_path / "smoke.json").read_text())
    assert rows, "no results written"
