"""Compile report: registers, spills, shared memory and estimated occupancy of every registered Triton
kernel config, compiled ahead of time for sm_80 and sm_90 (no GPU needed).

    python bench/compile_report.py                    # all cases, both archs (`make compile-report`)
    python bench/compile_report.py --only short_conv  # cases whose name contains a substring

Prints a markdown table and writes it with the raw numbers to bench/results/compile_report.md and .json.
Exit status 1 when a case fails to compile, spills, or exceeds its architecture's shared memory.
"""

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import triton

from ipl_layers.kernels.common import aot, registry

OUT = Path(__file__).resolve().parent / "results" / "compile_report"

HEADER = (
    "Modeled, not measured: each config is compiled without a GPU (`triton.compile` for a `GPUTarget`). "
    "Registers and spills come from ptxas, shared memory from Triton's metadata; occupancy is an "
    f"estimate of resident warps per SM (of {aot.MAX_WARPS_PER_SM}) from registers ({aot.REGS_PER_SM} per SM, "
    f"allocated per warp in units of {aot.REG_ALLOC_UNIT}), shared memory (1 KiB reserved per block) and "
    f"warp slots. Shared memory limits per block: "
    + ", ".join(f"sm_{a} {lim // aot.KIB} KiB" for a, lim in aot.SMEM_LIMIT.items())
    + "."
)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", type=int, nargs="+", default=list(aot.ARCHS), choices=list(aot.ARCHS))
    p.add_argument("--only", default=None, help="compile only cases whose name contains this substring")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    p.add_argument("--out", default=str(OUT), help="output path without suffix (.md and .json are written)")
    return p.parse_args(argv)


def _kib(n: int) -> str:
    return f"{n / aot.KIB:.1f}"


def markdown(results) -> str:
    lines = [
        "| kernel config | arch | warps | stages | regs | spill st/ld B | smem KiB | limit KiB | occupancy | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        status = ("; ".join(r.problems()) or "ok").splitlines()[0].replace("|", "\\|")  # one table cell
        if r.error:
            lines.append(f"| `{r.name}` | sm_{r.arch} | {r.num_warps} | {r.num_stages} | - | - | - | "
                         f"{_kib(r.smem_limit_bytes)} | - | {status} |")
            continue
        lines.append(
            f"| `{r.name}` | sm_{r.arch} | {r.num_warps} | {r.num_stages} | {r.regs} | "
            f"{r.spill_store_bytes}/{r.spill_load_bytes} | {_kib(r.smem_bytes)} | {_kib(r.smem_limit_bytes)} | "
            f"{r.occupancy_warps} warps ({r.occupancy:.0%}) | {status} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    cases = [c for c in registry.load_all() if args.only is None or args.only in c.name]
    if not cases:
        print("compile report: no registered compile cases" + (f" matching {args.only!r}" if args.only else ""),
              file=sys.stderr)
        return 1
    results = aot.compile_cases(cases, archs=args.archs, workers=args.workers)
    bad = [r for r in results if r.problems()]
    table = markdown(results)
    summary = f"{len(results) - len(bad)} of {len(results)} (config, arch) pairs ok"
    text = f"# Compile report (triton {triton.__version__})\n\n{HEADER}\n\n{table}\n\n{summary}\n"
    print(text)

    md, js = Path(args.out + ".md"), Path(args.out + ".json")
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text)
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "triton": triton.__version__,
        "archs": args.archs,
        "smem_limit_bytes": {f"sm_{a}": aot.SMEM_LIMIT[a] for a in args.archs},
        "results": [r.to_dict() for r in results],
    }
    js.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {md} and {js}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
