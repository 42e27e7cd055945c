"""`ipl-bench`: list the registered cases, time them against their peers, report, and model them on GPUs.

    ipl-bench list
    ipl-bench run OP... [--T 1024 4096] [--fwd | --fwdbwd] [--no-peers | --vs PEER...] [--out PATH]
                                                     # bench/run.py's loop
    ipl-bench run OP... --decode [--out PATH]        # one-token decode steps, fused C++ vs eager (bench/decode.py)
    ipl-bench report [PATH]                          # the latest results under bench/results/ as a table
    ipl-bench model OP... [--T 4096] [--B 8] [--H 16] [--D 64]   # modeled GPU cost: IO counts + roofline
    ipl-bench launches [LAYER...] [--T 128 256]      # kernel launches per layer forward and backward

`run` writes <out>.md and .json (bench/run.py) plus <out>.csv and <out>.png (time vs T, ours vs peers); with
`--decode`, <out>.md, .json and .csv of bench/decode.py's op and layer cases whose names contain an OP.
`model` and `launches` write bench/results/model.md, launches.md and their .json.
Runs from a source checkout: bench/ is not installed (ipl_layers/bench_cli.py says why).
"""

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import run as bench_run
from registry import Shape, select
from report import ROOT, markdown

RESULTS = ROOT / "bench" / "results"
NOT_RESULTS = ("compile_report", "model", "launches")  # files under bench/results/ that are not timing runs
CSV_FIELDS = ("case", "T", "pass", "impl", "role", "status", "median_s", "iqr_s", "calls", "peak_bytes",
              "speedup", "flops", "math")


def cmd_list(args):
    from iomodel.model import PASSED_STATES

    for case in select(None):
        peers = ", ".join(i.label for i in case.impls[1:]) or "-"
        modeled = "IO model with passed states" if case.op in PASSED_STATES else "IO model (strict minimum only)"
        print(f"{case.name:32s} ours: {case.impls[0].label}; peers: {peers}; {modeled}")
    return 0


def cmd_decode(args, extra):
    import decode

    if args.T:
        raise SystemExit("ipl-bench run --decode: decode steps take one token; --T does not apply")
    out = Path(args.out) if args.out else RESULTS / "run_decode"
    decode.main(["--only", *args.ops, "--out", str(out)] + extra)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]) if rows else ["case"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}.md, .json, .csv", file=sys.stderr)
    return 0


def cmd_run(args, extra):
    if args.decode:
        return cmd_decode(args, extra)
    out = Path(args.out) if args.out else RESULTS / "run"
    passes = ["fwd"] if args.fwd else ["fwd+bwd"] if args.fwdbwd else list(bench_run.PASSES)
    argv = ["--ops", *args.ops, "--out", str(out), "--passes", *passes] + extra
    argv += (["--T", *map(str, args.T)] if args.T else []) + (["--no-peers"] if args.no_peers else [])
    argv += ["--vs", *args.vs] if args.vs else []
    code = bench_run.main(argv)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    write_csv(rows, out.with_suffix(".csv"))
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out}.md, .json, .csv, .png", file=sys.stderr)
    return code


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot(rows, path):
    """One panel per case: median time vs T per implementation, solid fwd, dashed fwd+bwd, log-log."""
    import matplotlib

    matplotlib.use("Agg")  # no display on benchmark machines
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 4), squeeze=False)
    for ax, case in zip(axes[0], cases):
        mine = [r for r in rows if r["case"] == case and r["status"] == "ok"]
        for impl in dict.fromkeys(r["impl"] for r in mine):
            for pass_name, style in (("fwd", "-"), ("fwd+bwd", "--")):
                pts = sorted((r["T"], r["median_s"] * 1e3) for r in mine if (r["impl"], r["pass"]) == (impl, pass_name))
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", label=f"{impl} {pass_name}")
        ax.set(title=case, xlabel="T", ylabel="median ms (CPU)", xscale="log", yscale="log")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def latest_results():
    runs = [p for p in RESULTS.glob("*.json") if p.stem not in NOT_RESULTS]
    if not runs:
        raise SystemExit(f"no results under {RESULTS}: run `ipl-bench run OP` first")
    return max(runs, key=lambda p: p.stat().st_mtime)


def cmd_report(args):
    path = Path(args.path) if args.path else latest_results()
    record = json.loads(path.read_text())
    goals = [(t["target"], t["value"], t["met"]) for t in record["targets"]]
    print(f"# {path}\n")
    print(markdown(record["machine"], record["rows"], goals))
    return 0


def cmd_model(args):
    from iomodel.report import model_table

    shape = Shape(B=args.B, T=args.T, H=args.H, K=args.D, V=args.D, chunk=args.chunk)
    write_model(*model_table(select(args.ops), shape), args.out or RESULTS / "model")
    return 0


def cmd_launches(args):
    from iomodel.launches import LAYERS
    from iomodel.report import launches_table

    text, record = launches_table(args.layers or LAYERS, args.T, args.hidden, args.heads)
    write_model(text, record, args.out or RESULTS / "launches")
    return 0


def write_model(text, record, out):
    print(text)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}.md and .json", file=sys.stderr)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="ipl-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered cases, their peers and whether the IO model covers them")
    r = sub.add_parser("run", help="time cases (bench/run.py; its other options pass through)")
    r.add_argument("ops", nargs="+", help="case names or op names")
    r.add_argument("--T", type=int, nargs="+", default=None)
    which = r.add_mutually_exclusive_group()
    which.add_argument("--fwd", action="store_true", help="forward only")
    which.add_argument("--fwdbwd", action="store_true", help="forward+backward only")
    which.add_argument("--decode", action="store_true", help="one-token decode steps (bench/decode.py's cases)")
    peers = r.add_mutually_exclusive_group()
    peers.add_argument("--no-peers", action="store_true")
    peers.add_argument("--vs", nargs="+", default=None, metavar="PEER", help="only the peers whose label contains one")
    r.add_argument("--out", default=None, help="path without suffix (default bench/results/run)")
    rep = sub.add_parser("report", help="a results JSON as a table (default: the latest under bench/results/)")
    rep.add_argument("path", nargs="?", default=None)
    m = sub.add_parser("model", help="modeled GPU cost: interpreter IO/FLOP counts projected on a roofline")
    m.add_argument("ops", nargs="+", help="case names or op names")
    m.add_argument("--T", type=int, default=4096)
    m.add_argument("--B", type=int, default=8)
    m.add_argument("--H", type=int, default=16)
    m.add_argument("--D", type=int, default=64, help="K = V head dim")
    m.add_argument("--chunk", type=int, default=64)
    m.add_argument("--out", default=None, help="path without suffix (default bench/results/model)")
    n = sub.add_parser("launches", help="kernel launches per layer forward and backward (Triton exact, torch approx.)")
    n.add_argument("layers", nargs="*", help="layer class names (default: every layer with a Triton backend)")
    n.add_argument("--T", type=int, nargs="+", default=[128, 256])
    n.add_argument("--hidden", type=int, default=64)
    n.add_argument("--heads", type=int, default=2)
    n.add_argument("--out", default=None, help="path without suffix (default bench/results/launches)")
    return p.parse_known_args(argv)


INTERPRETED = ("model", "launches")  # the commands that run our Triton kernels in the interpreter


def main(argv=None):
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command in INTERPRETED and os.environ.get("TRITON_INTERPRET") != "1":
        if argv is not None:
            raise SystemExit(f"ipl-bench {args.command}: set TRITON_INTERPRET=1 before Python starts")
        # triton fixes interpreted-or-compiled when each function is decorated, and triton is already imported
        # (through torch) before this runs: start the same command again with the interpreter on from the start
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "TRITON_INTERPRET": "1"})
    if args.command == "run":
        return cmd_run(args, extra)
    if extra:
        raise SystemExit(f"ipl-bench {args.command}: unrecognized arguments {' '.join(extra)}")
    commands = {"list": cmd_list, "report": cmd_report, "model": cmd_model, "launches": cmd_launches}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
