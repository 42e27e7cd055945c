"""CPU benchmark of our ops against their peers, side by side in one process.

    python bench/run.py --demo              # T=1024, every op, about a minute
    python bench/run.py                     # T=1024 and 4096 (`make bench`)
    python bench/run.py --T 4096 --ops linear_attention:plain --no-peers --out bench/results/mine

Prints a markdown table and writes it with the raw numbers to <out>.md and <out>.json.
What is measured and how: bench/README.md.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from registry import BASELINE, OURS, Shape, select
from report import ROOT, TARGET_T, machine_info, markdown, targets
from timing import matmul_flops_per_second, median_seconds, peak_tensor_bytes

CHECK_SHAPE = Shape(B=1, T=128, H=2, K=32, V=32, chunk=64)
CHECK_BOUND = 1e-4  # relative RMS of a same-math peer's o and gradients against ours, fp32
PASSES = ("fwd", "fwd+bwd")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", action="store_true", help="the embedded default: T=1024, short timings")
    p.add_argument("--T", type=int, nargs="+", default=None, help="sequence lengths (default 1024 4096)")
    p.add_argument("--ops", nargs="+", default=None, help="case names or op names (default: all)")
    p.add_argument("--no-peers", action="store_true", help="time only our implementations")
    p.add_argument("--vs", nargs="+", default=None, metavar="PEER",
                   help="time only the peers whose label contains one of these (case-insensitive)")
    p.add_argument("--out", default=None, help="output path without suffix (default bench/results/<demo|cpu>)")
    p.add_argument("--backend", default="torch", help="backend= of our ops (default torch)")
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--D", type=int, default=64, help="K = V head dim")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-run-time", type=float, default=None, help="seconds per timing (demo 0.2, else 1.0)")
    p.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES, help="default: both")
    args = p.parse_args(argv)
    args.T = args.T or ([1024] if args.demo else [1024, TARGET_T])
    args.out = Path(args.out) if args.out else ROOT / "bench" / "results" / ("demo" if args.demo else "cpu")
    args.min_run_time = args.min_run_time or (0.2 if args.demo else 1.0)
    return args


def wanted(label: str, vs) -> bool:
    """Whether a peer is among those `--vs` names (all peers without `--vs`)."""
    return vs is None or any(v.lower() in label.lower() for v in vs)


def load_impls(case, args):
    """(impl, fn or None, status) per implementation, ours first; a peer that fails to import is
    "not installed", ours failing to import is an error that stops the run."""
    loaded = []
    for impl in case.impls:
        if impl.role != OURS and (args.no_peers or not wanted(impl.label, args.vs)):
            continue
        try:
            fn, status = impl.load(args.backend, case.chunk or args.chunk), "ok"
        except ImportError as e:
            if impl.role == OURS:
                raise
            fn, status = None, f"not installed ({e.name or e})"
        loaded.append((impl, fn, status))
    return loaded


def prepared(impl, inputs, requires_grad):
    """The impl's own layout, as fresh leaves (gradients are taken with respect to these)."""
    args = impl.layout(inputs) if impl.layout else dict(inputs)
    return {name: x.detach().clone().requires_grad_(requires_grad) for name, x in args.items()}


def output_and_grads(fn, args, gen):
    o = fn(**args)  # [B, T, H, V]
    do = torch.randn(o.shape, generator=gen)
    grads = torch.autograd.grad(o, list(args.values()), do)
    return [o] + list(grads)


def check_same_math(case, ours_fn, ours_impl, peer_fn, peer_impl):
    """Worst relative RMS of the peer's o and input gradients against ours on CHECK_SHAPE (untimed)."""
    inputs = case.make_inputs(CHECK_SHAPE, torch.Generator().manual_seed(1))
    ours = output_and_grads(ours_fn, prepared(ours_impl, inputs, True), torch.Generator().manual_seed(2))
    peer = output_and_grads(peer_fn, prepared(peer_impl, inputs, True), torch.Generator().manual_seed(2))
    return max(((p.double() - o.double()).norm() / o.double().norm()).item() for o, p in zip(ours, peer))


PROFILE_MAX_SECONDS = 1.0  # slower calls (token-by-token peers at T=4096) would fill memory with profiler events


def _with_peak(fn, timing, always):
    """Timing plus the call's peak tensor bytes, or None where a call is too long to profile (unless `always`:
    a memory target needs it)."""
    return timing + ((peak_tensor_bytes(fn)[0] if always or timing[0] <= PROFILE_MAX_SECONDS else None),)


def measure(fn, impl, inputs, min_run_time, always_profile=False, passes=PASSES):
    """{pass: (median seconds, IQR seconds, timed calls, peak bytes or None)}: the forward, then forward+backward
    with the gradients of every input (and of a layer's parameters); only the passes asked for."""
    args = prepared(impl, inputs, False)
    forward = lambda: fn(**args)  # noqa: E731
    result = {}
    if "fwd" in passes:
        result["fwd"] = _with_peak(forward, median_seconds(forward, min_run_time), always_profile)
    if "fwd+bwd" not in passes:
        return result
    o = forward()
    args = prepared(impl, inputs, True)
    # layers: their parameters' gradients too (a training step computes them)
    params = fn.parameters() if hasattr(fn, "parameters") else []
    leaves, do = list(args.values()) + params, torch.randn(o.shape, generator=torch.Generator().manual_seed(3))
    # materialized: an input or parameter can go unused (LaCT below two chunks never reads k; unused options)
    step = lambda: torch.autograd.grad(fn(**args), leaves, do, allow_unused=True, materialize_grads=True)  # noqa: E731
    result["fwd+bwd"] = _with_peak(step, median_seconds(step, min_run_time), always_profile)
    return result


def verify(case, loaded, failures):
    """{label: (math relative to ours, checked relative error or None)}; same-math peers are run on
    CHECK_SHAPE and compared with ours."""
    math = {}
    for impl, fn, status in loaded:
        if fn is None or impl.role == OURS:
            math[impl.label] = ("-", None)
        elif impl.role == BASELINE:
            math[impl.label] = ("different", None)
        else:
            try:
                err = check_same_math(case, loaded[0][1], loaded[0][0], fn, impl)
            except Exception as e:  # reported in the table; the timings below say whether it runs at all
                math[impl.label] = (f"check failed: {type(e).__name__}: {e}", None)
                continue
            if err > CHECK_BOUND:
                failures.append(f"{case.name}: {impl.label} differs from ours by {err:.1e} > {CHECK_BOUND:.0e}")
            verdict = "same" if err <= CHECK_BOUND else "MISMATCH"
            math[impl.label] = (f"{verdict} (rel err {err:.1e})", err)
    return math


def run_case(case, args, rows, failures):
    loaded = load_impls(case, args)
    math = verify(case, loaded, failures)
    for T in args.T:
        shape = Shape(B=args.B, T=T, H=args.H, K=args.D, V=args.D, chunk=case.chunk or args.chunk)
        inputs = case.make_inputs(shape, torch.Generator().manual_seed(0))
        results = {}  # label -> measure()'s dict, or the reason there is none
        for impl, fn, status in loaded:
            results[impl.label] = status
            if fn is None:
                continue
            if impl.max_T is not None and T > impl.max_T:
                results[impl.label] = f"not timed above T = {impl.max_T}"
                continue
            print(f"  {case.name} T={T}: {impl.label}", file=sys.stderr, flush=True)
            try:
                always = any(i.goal is not None for i in case.impls)  # a memory target compares peaks
                results[impl.label] = measure(fn, impl, inputs, args.min_run_time, always, args.passes)
            except Exception as e:  # a broken peer or op becomes a row, not a crash
                results[impl.label] = f"error: {type(e).__name__}: {e}"
                if impl.role == OURS:
                    failures.append(f"{case.name} T={T}: {results[impl.label]}")
        rows += table_rows(case, shape, loaded, math, results, args.passes)


def table_rows(case, shape, loaded, math, results, passes=PASSES):
    """One row per pass and implementation, ours first within each pass."""
    ours = results[loaded[0][0].label]
    rows = []
    for pass_name in passes:
        for impl, _, _ in loaded:
            got = results[impl.label]
            row = {"case": case.name, "T": shape.T, "pass": pass_name, "impl": impl.label, "role": impl.role,
                   "math": math[impl.label][0], "check_rel_err": math[impl.label][1], "note": impl.note,
                   "shape": vars(shape), "status": got if isinstance(got, str) else "ok"}
            if row["status"] == "ok":
                row["median_s"], row["iqr_s"], row["calls"], row["peak_bytes"] = got[pass_name]
                if impl.role != OURS and not isinstance(ours, str):
                    row["speedup"] = row["median_s"] / ours[pass_name][0]
                if impl.role == OURS and case.fwd_flops is not None:  # the backward: 2 matmuls per forward one
                    row["flops"] = case.fwd_flops(shape) * (1 if pass_name == "fwd" else 3)
            rows.append(row)
    return rows


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    matmul_rate, matmul_seconds = matmul_flops_per_second(2048, args.min_run_time)
    rows, failures, cases = [], [], select(args.ops)
    for case in cases:
        run_case(case, args, rows, failures)
    info = machine_info(args, matmul_rate, matmul_seconds, load_before)
    goals = targets(cases, rows, matmul_rate)
    report = markdown(info, rows, goals)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(report)
    record = {"machine": info, "rows": rows, "targets": [{"target": t, "value": v, "met": m} for t, v, m in goals],
              "failures": failures}
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
