"""bench/models.py runs end to end on a tiny hybrid (no timing claims) and writes its table and raw numbers."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_model_bench_runs_and_writes_results(tmp_path):
    out = tmp_path / "models"
    cmd = [sys.executable, "bench/models.py", "--T", "64", "--decode-context", "32", "--hidden", "32", "--heads", "2",
           "--layers", "4", "--vocab", "64", "--window", "8", "--memory-keys", "8", "--min-run-time", "0.01",
           "--decode-runs", "1", "--threads", "1", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert [(row["pass"], row["T"]) for row in result["rows"]] == [("fwd+bwd", 64)]
    assert all(row[m]["tokens_per_s"] > 0 for row in result["rows"] for m in ("hybrid", "attention"))
    decode = result["info"]["decode"]
    assert list(decode) == ["hybrid", "attention", "hybrid (eager torch steps)", "mamba2 (transformers)"]
    assert all(r["tokens_per_s"] > 0 for r in decode.values())
    assert result["info"]["hybrid"] == ["swa", "ttt_linear", "swa", "gated_deltanet"]
    assert "| mamba2 (transformers), " in out.with_suffix(".md").read_text()
