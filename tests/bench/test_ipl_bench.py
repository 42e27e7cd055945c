"""`ipl-bench` end to end on tiny shapes: run writes JSON/CSV/PNG, report reads them, list and model answer."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def ipl_bench(*args, cwd=ROOT):
    """The console script's entry module, in a fresh process as the installed script would run, without the
    interpreter switch the tests run under (the `model` command sets it itself)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "ipl_layers.bench_cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_run_writes_json_csv_png_and_report_reads_them(tmp_path):
    out = tmp_path / "tiny"
    ipl_bench("run", "linear_attention:plain", "--T", "32", "64", "--fwd", "--H", "1", "--D", "16",
              "--chunk", "16", "--min-run-time", "0.01", "--threads", "1", "--out", str(out))
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert {(r["T"], r["pass"]) for r in rows} == {(32, "fwd"), (64, "fwd")}
    assert {r["role"] for r in rows} >= {"ours", "baseline"}  # peers side by side (SDPA is always there)
    with open(out.with_suffix(".csv")) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "linear_attention:plain" in ipl_bench("report", str(out.with_suffix(".json")))


def test_list_names_every_case():
    assert "linear_attention:key_decay" in ipl_bench("list", cwd="/")  # found from anywhere, not only the root


def test_model_prints_a_modeled_table(tmp_path):
    text = ipl_bench("model", "linear_attention:plain", "--T", "256", "--B", "1", "--H", "2", "--D", "16",
                     "--chunk", "16", "--out", str(tmp_path / "m"))
    assert "modeled" in text and "| linear_attention:plain | bwd |" in text
    rows = json.loads((tmp_path / "m.json").read_text())["rows"]
    assert all(0 < r["io_efficiency"] <= 1 for r in rows), rows


def test_run_vs_keeps_only_the_named_peers(tmp_path):
    out = tmp_path / "vs"
    ipl_bench("run", "linear_attention:plain", "--T", "32", "--fwd", "--H", "1", "--D", "16", "--chunk", "16",
              "--min-run-time", "0.01", "--threads", "1", "--vs", "sdpa", "--out", str(out))
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert {r["impl"] for r in rows if r["role"] != "ours"} == {"torch SDPA causal"}


def test_run_decode_writes_the_decode_cases(tmp_path):
    out = tmp_path / "decode"
    ipl_bench("run", "delta_rule", "--decode", "--batch", "1", "--K", "8", "--min-run-time", "0.01", "--out", str(out))
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert rows and all("delta" in r["case"].lower() for r in rows)
    with open(out.with_suffix(".csv")) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
