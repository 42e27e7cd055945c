"""The modeled-GPU table of `ipl-bench model`: IO efficiency and roofline time per case and pass."""

from dataclasses import asdict

from iomodel.launches import build_layer, layer_launches
from iomodel.model import PASSES, model
from iomodel.roofline import DEVICES, H100_SXM, roofline

HEADER = (
    "All times are **modeled**, not measured: Triton kernels run under the interpreter with counted loads, "
    "stores and dots (bench/iomodel/counter.py) at 2 and 3 chunks, B = H = 1, bf16 inputs, extrapolated per "
    "chunk to the shape below, then max(bytes / bandwidth, FLOPs / peak) on each device with the counted "
    "bytes (no cache between programs). Torch glue between kernels and launch latency are not counted."
)


def model_table(cases, shape):
    """(markdown text, JSON-ready record) for every case and pass; a case that cannot run gets an error row."""
    s = shape
    lines = [f"# Modeled GPU cost (B={s.B}, T={s.T}, H={s.H}, K={s.K}, V={s.V}, chunk={s.chunk}, bf16)", "",
             HEADER, "",
             "| case | pass | launches | counted MB | perfect-cache MB | minimum MB (strict) | IO efficiency (strict) "
             "| GFLOP | FLOP/B | " + " | ".join(f"{d.name} modeled us" for d in DEVICES)
             + f" | {H100_SXM.name} modeled us at minimum |",
             "|---" * (10 + len(DEVICES)) + "|"]
    rows = []
    for case in cases:
        for pass_name in PASSES:
            try:
                m = model(case, pass_name, shape)
            except Exception as e:  # a case without a Triton path: a row that says why
                rows.append({"case": case.name, "pass": pass_name, "error": f"{type(e).__name__}: {e}"})
                lines.append(f"| {case.name} | {pass_name} | {rows[-1]['error'][:80].replace('|', '/')} |")
                continue
            c = m.counts
            times = {d.name: roofline(c.bytes, c.flops, d) for d in DEVICES}
            at_min = roofline(m.min_bytes or m.strict_min_bytes, c.flops, H100_SXM)
            rows.append({"case": case.name, "pass": pass_name, "counts": asdict(c),
                         "per_chunk_and_head_bytes": m.per_chunk.traffic, "min_bytes": m.min_bytes,
                         "strict_min_bytes": m.strict_min_bytes, "io_efficiency": m.io_efficiency,
                         "strict_io_efficiency": m.strict_min_bytes / c.bytes,
                         "modeled_seconds": {n: {"seconds": t, "bound": b} for n, (t, b) in times.items()},
                         "modeled_seconds_at_minimum_h100": at_min[0]})
            eff = "-" if m.io_efficiency is None else f"{m.io_efficiency:.2f}"
            minimum = "-" if m.min_bytes is None else f"{m.min_bytes / 1e6:.1f}"
            lines.append(
                f"| {case.name} | {pass_name} | {sum(c.launches.values())} | {c.bytes / 1e6:.1f} | "
                f"{c.unique_bytes / 1e6:.1f} | {minimum} ({m.strict_min_bytes / 1e6:.1f}) | "
                f"{eff} ({m.strict_min_bytes / c.bytes:.2f}) | {c.flops / 1e9:.2f} | {c.flops / c.bytes:.0f} | "
                + " | ".join(f"{t * 1e6:.1f} ({b})" for t, b in times.values()) + f" | {at_min[0] * 1e6:.1f} |")
    lines += ["", "minimum: inputs read once, outputs written once, plus the chunk states the two-pass algorithm "
              "writes and reads back (bench/iomodel/model.py); strict: without those states.", "",
              f"Where the bytes go: KB per chunk of {shape.chunk} tokens and head, by kernel and argument "
              f"(K={shape.K}, V={shape.V}, bf16)", "",
              "| case | pass | kernel: argument direction | KB |", "|---|---|---|---|"]
    for r in rows:
        for key, b in r.get("per_chunk_and_head_bytes", {}).items():
            if b:
                lines.append(f"| {r['case']} | {r['pass']} | {key} | {b / 1e3:.2f} |")
    return "\n".join(lines) + "\n", {"shape": asdict(shape), "method": HEADER, "rows": rows}


def launches_table(layers, lengths, hidden_size, num_heads):
    """(markdown, record): launches per layer and pass at each length (a count that grows with T is a host loop)."""
    import torch

    lines = [f"# Kernel launches per layer call (hidden {hidden_size}, {num_heads} heads, backend=triton)", "",
             "Triton launches are counted exactly under the interpreter; torch operators (dispatched aten operators "
             "other than views and allocations, taken as one GPU kernel each) are an approximation.", "",
             "| layer | pass | T | Triton launches | torch ops (approx.) | Triton kernels |",
             "|---|---|---|---|---|---|"]
    rows = []
    for name in layers:
        for T in lengths:
            x = torch.randn(1, T, hidden_size, generator=torch.Generator().manual_seed(0))
            try:
                counts = layer_launches(build_layer(name, hidden_size, num_heads), x)
            except Exception as e:  # a layer whose ops have no Triton path yet: a row that says why
                rows.append({"layer": name, "T": T, "error": f"{type(e).__name__}: {e}"})
                lines.append(f"| {name} | - | {T} | {rows[-1]['error'][:80].replace('|', '/')} | - | - |")
                continue
            for pass_name, c in counts.items():
                rows.append({"layer": name, "pass": pass_name, "T": T, **c})
                kernels = ", ".join(f"{k} x{n}" if n > 1 else k for k, n in c["triton"].items())
                lines.append(f"| {name} | {pass_name} | {T} | {sum(c['triton'].values())} | "
                             f"{sum(c['torch_ops'].values())} | {kernels} |")
    return "\n".join(lines) + "\n", {"hidden_size": hidden_size, "num_heads": num_heads, "rows": rows}
