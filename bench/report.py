"""The benchmark's record: machine description, targets met or not, and the markdown table."""

import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parent.parent
TARGET_T = 4096
TARGET_MATMUL_FRACTION = 0.30  # our forward at T=4096, in chunked-algorithm FLOP/s over GEMM FLOP/s
STATUS_WIDTH = 80  # characters of an error shown in a table cell
BUSY_MARGIN = 0.5  # load average beyond the cores our threads leave free: someone else is computing


def targets(cases, rows, matmul_rate):
    """(description, value, met) per target; value and met are None when it was not measured."""
    def at_target(case, impl, pass_name, T=TARGET_T):
        key = (case.name, impl.label, pass_name, T, "ok")
        return next((r for r in rows if (r["case"], r["impl"], r["pass"], r["T"], r["status"]) == key), None)

    out = []
    for case in cases:
        if case.fwd_flops is not None:
            T, pass_name, goal = case.matmul_target or (TARGET_T, "fwd", TARGET_MATMUL_FRACTION)
            row = at_target(case, case.impls[0], pass_name, T)
            frac = row["flops"] / row["median_s"] / matmul_rate if row else None
            out.append((f"{case.name}: ours {pass_name} at T={T} >= {goal:.0%} of GEMM FLOP/s",
                        None if frac is None else f"{frac:.1%}", None if frac is None else frac >= goal))
        for impl in case.impls:
            if impl.goal is not None:
                speed, memory = impl.goal
                peer = at_target(case, impl, "fwd+bwd")
                ours = at_target(case, case.impls[0], "fwd+bwd")
                speedup = peer.get("speedup") if peer else None
                peaks = (ours or {}).get("peak_bytes"), (peer or {}).get("peak_bytes")
                ratio = peaks[0] / peaks[1] if None not in peaks else None
                out.append((f"{case.name}: ours fwd+bwd at T={TARGET_T} >= {speed:g}x faster than {impl.label}",
                            None if speedup is None else f"{speedup:.2f}x",
                            None if speedup is None else speedup >= speed))
                if memory is not None:
                    out.append((f"{case.name}: ours fwd+bwd peak at T={TARGET_T} <= {memory:g} x {impl.label}'s",
                                None if ratio is None else f"{ratio:.2f}x", None if ratio is None else ratio <= memory))
        if case.within is not None:
            other_name, limit = case.within
            ours = at_target(case, case.impls[0], "fwd+bwd")
            other = next((at_target(c, c.impls[0], "fwd+bwd") for c in cases if c.name == other_name), None)
            ratio = ours["median_s"] / other["median_s"] if ours and other else None
            out.append((f"{case.name}: ours fwd+bwd at T={TARGET_T} within {limit:g}x of ours {other_name} "
                        "(same run)", None if ratio is None else f"{ratio:.2f}x",
                        None if ratio is None else ratio <= limit))
    return out


def machine_info(args, matmul_rate, matmul_seconds, load_before):
    """What the numbers depend on. The load averages show whether other processes shared the cores."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    try:
        import fla
        fla_version = fla.__version__
    except ImportError:
        fla_version = "not installed"
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu, "logical_cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "fla": fla_version, "python": platform.python_version(),
            "commit": commit, "dtype": "float32", "backend": args.backend, "min_run_time_s": args.min_run_time,
            "load_average_1min": {"start": load_before[0], "end": os.getloadavg()[0]},
            "matmul": {"n": 2048, "median_s": matmul_seconds, "flops_per_s": matmul_rate}}


def markdown(info, rows, goals):
    lines = [
        f"# CPU benchmark ({info['dtype']}, {info['threads']} threads, backend={info['backend']})", "",
        f"{info['cpu']} ({info['logical_cpus']} logical CPUs, 1-min load average "
        f"{info['load_average_1min']['start']:.1f} at start, {info['load_average_1min']['end']:.1f} at end), "
        f"torch {info['torch']}, fla {info['fla']}, commit {info['commit']}, {info['date']}.",
        f"fp32 GEMM 2048^3: {info['matmul']['median_s'] * 1e3:.1f} ms = "
        f"{info['matmul']['flops_per_s'] / 1e9:.1f} GFLOP/s.", "",
    ]
    if info["load_average_1min"]["start"] > info["logical_cpus"] - info["threads"] + BUSY_MARGIN:
        lines += ["**Warning: other processes were using the cores at start (see the load average); "
                  "timings are not reliable.**", ""]
    lines += [
        "| case | T | pass | implementation | math vs ours | median ms | IQR ms | calls | peak MiB | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['case']} | {r['T']} | {r['pass']} | {r['impl']} | {r['math']} "
        if r["status"] != "ok":
            status = r["status"].strip().splitlines()[0][:STATUS_WIDTH].replace("|", "/")  # full text in the JSON
            lines.append(head + f"| {status} | - | - | - | - |")
            continue
        speedup = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}"
        lines.append(head + f"| {r['median_s'] * 1e3:.2f} | {r['iqr_s'] * 1e3:.2f} | {r['calls']} | {peak} | {speedup} |")
    lines += ["", "| case | T | pass | ours ms | chunked FLOP | GFLOP/s | of GEMM rate |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "flops" in r:
            rate = r["flops"] / r["median_s"]
            lines.append(f"| {r['case']} | {r['T']} | {r['pass']} | {r['median_s'] * 1e3:.2f} | {r['flops'] / 1e9:.3f} G "
                         f"| {rate / 1e9:.1f} | {rate / info['matmul']['flops_per_s']:.1%} |")
    notes = dict.fromkeys(f"- {r['impl']}: {r['note']}" for r in rows if r["note"])
    lines += ["", "Implementations:"] + list(notes) + ["", "Targets:"]
    for text, value, met in goals:
        verdict = "not evaluated (not measured at that length)" if met is None else ("met" if met else "NOT met")
        lines.append(f"- {text}: {value or '-'} — {verdict}")
    lines += ["", "speed-up = the implementation's median / ours (> 1: ours is faster). peak MiB ('-': a call over 1 s, not profiled): tensor bytes "
              "live at once during one call beyond the inputs (profiler allocator events; bench/README.md)."]
    return "\n".join(lines) + "\n"


