"""CPU decode benchmark: one token at a time through every op and layer that has a fused C++ step, the fused
step against eager torch (the same call with the extension switched off) side by side in one run.

    python bench/decode.py --out bench/results/decode          # B = 1 and 16, H = 4, K = V = 64
    python bench/decode.py --batch 1 --K 8 --min-run-time 0.01  # smoke
    python bench/decode.py --only ttt_mlp TTTMLP --out /tmp/decode_ttt_mlp         # some cases

Per case: median seconds per step, one token of each of the B sequences (`torch.utils.benchmark`), tokens/s
(B / median) and the eager/fused ratio; the fused output is checked against the eager one first. Layers
decode with a cache after a short prefill, under no_grad (what `generate()` does). Writes a markdown table
and JSON; the issue's target (the fused path >= 5x faster than eager torch per layer at B = 1) is reported
as met or NOT met.
"""

import argparse
import contextlib
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_seconds  # noqa: E402

from ipl_layers import _ext  # noqa: E402
from ipl_layers.layers import (  # noqa: E402
    DeltaNet, GatedDeltaNet, GatedLinearAttention, LinearAttention, TitansMemory, TTTLinear, TTTMLP,
)
from ipl_layers.ops import delta_rule, linear_attention, short_conv, titans_memory, ttt_linear, ttt_mlp  # noqa: E402
from ipl_layers.state import TitansState, TTTLinearState, TTTMLPState  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "decode"
TARGET = 5.0  # the target: fused >= 5x eager torch per layer at B = 1
CONV_WIDTH, MINI_BATCH, PREFILL = 4, 16, 5
TITANS_DEPTH, TITANS_EXPAND, TITANS_CHUNK = 2, 4, 64  # the TitansMemory layer's defaults
TTT_MLP_EXPAND = 4  # the TTTMLP layer's default: F = 4 K


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--K", type=int, default=64, help="key and value head dim (K = V)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both paths")
    p.add_argument("--min-run-time", type=float, default=0.2, help="seconds per timing (adaptive autorange)")
    p.add_argument("--out", default=str(OUT), help="output path without suffix (.md and .json are written)")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help="run only the cases whose name contains one of these (default: all)")
    return p.parse_args(argv)


@contextlib.contextmanager
def eager():
    """The ops' torch path on one token: `_ext.step_applies` sees no extension."""
    available = _ext.available
    _ext.available = lambda: False
    try:
        yield
    finally:
        _ext.available = available


def op_cases(B, H, K):
    """(name, step, fresh) per op: `step` decodes one token and returns the output, from a fixed state, or for the
    "in place" cases from its own state, which it advances (`update_state_in_place`: what a layer does with its
    cache); `fresh` decodes that token from a copy of the state, to compare outputs."""
    q, k, v = torch.randn(B, 1, H, K), F.normalize(torch.randn(B, 1, H, K), dim=-1), torch.randn(B, 1, H, K)
    S = torch.randn(B, H, K, K)  # [B, H, K, V]
    beta, g = torch.rand(B, 1, H), F.logsigmoid(torch.randn(B, 1, H))  # [B, 1, H]
    g_key = F.logsigmoid(torch.randn(B, 1, H, K))  # [B, 1, H, K]
    D = H * K
    x, weight, conv_state = torch.randn(B, 1, D), torch.randn(D, CONV_WIDTH), torch.randn(B, D, CONV_WIDTH - 1)
    eta = 0.01 * torch.rand(B, 1, H)
    ttt_state = TTTLinearState(0.02 * torch.randn(B, H, K, K), torch.zeros(B, H, K), 0.01 * torch.randn(B, H, K, K),
                               torch.zeros(B, H, K), torch.full((B,), 3, dtype=torch.long))
    Fm = TTT_MLP_EXPAND * K
    mlp_weights = (0.02 * torch.randn(B, H, K, Fm), torch.zeros(B, H, Fm), 0.02 * torch.randn(B, H, Fm, K),
                   torch.zeros(B, H, K))  # W1 [B, H, K, F], b1, W2 [B, H, F, K], b2 as the layer's init
    mlp_state = TTTMLPState(*mlp_weights, *(0.01 * torch.randn_like(w) for w in mlp_weights),
                            torch.full((B,), 3, dtype=torch.long))
    F_ = TITANS_EXPAND * K
    titans_weights = (torch.randn(B, H, K, F_) / K**0.5, torch.randn(B, H, F_, K) / F_**0.5)  # [B, H, d_l, d_l+1]
    theta, alpha = 0.01 * torch.rand(B, 1, H), 0.01 * torch.rand(B, 1, H)
    la = dict(initial_state=S, output_final_state=True, backend="torch")
    titans_state = TitansState.of(list(titans_weights), [0.01 * torch.randn_like(w) for w in titans_weights],
                                  [w.clone() for w in titans_weights], torch.full((B,), 3, dtype=torch.long))

    def in_place(op, state, *args, **kw):  # (step, fresh) of an op decoding from its own state
        def step(fresh=False):
            own = type(state)(*(x.clone() for x in state)) if fresh else state
            return op(q, k, v, *args, initial_state=own, output_final_state=True, update_state_in_place=True,
                      backend="torch", **kw)[0]
        return step, lambda: step(fresh=True)

    fixed = [
        ("linear_attention g=none", lambda: linear_attention(q, k, v, **la)[0]),
        ("linear_attention g=scalar", lambda: linear_attention(q, k, v, g=g, **la)[0]),
        ("linear_attention g=per-key", lambda: linear_attention(q, k, v, g=g_key, **la)[0]),
        ("delta_rule", lambda: delta_rule(q, k, v, beta, **la)[0]),
        ("delta_rule gated", lambda: delta_rule(q, k, v, beta, g, **la)[0]),
        ("short_conv W=4 silu", lambda: short_conv(x, weight, activation="silu", initial_state=conv_state,
                                                     output_final_state=True, backend="torch")[0]),
        ("ttt_linear b=16", lambda: ttt_linear(q, k, v, eta, mini_batch_size=MINI_BATCH, initial_state=ttt_state,
                                              output_final_state=True, backend="torch")[0]),
        ("ttt_mlp b=16", lambda: ttt_mlp(q, k, v, eta, mini_batch_size=MINI_BATCH, initial_state=mlp_state,
                                        output_final_state=True, backend="torch")[0]),
        (f"titans_memory depth={TITANS_DEPTH}", lambda: titans_memory(
            q, k, v, theta, beta, alpha, chunk_size=TITANS_CHUNK, initial_state=titans_weights,
            output_final_state=True, backend="torch")[0]),
    ]
    own = [
        ("ttt_linear b=16 in place", *in_place(ttt_linear, TTTLinearState(*(x.clone() for x in ttt_state)), eta,
                                               mini_batch_size=MINI_BATCH)),
        ("ttt_mlp b=16 in place", *in_place(ttt_mlp, TTTMLPState(*(x.clone() for x in mlp_state)), eta,
                                            mini_batch_size=MINI_BATCH)),
        (f"titans_memory depth={TITANS_DEPTH} in place", *in_place(titans_memory, titans_state, theta, beta, alpha,
                                                                   chunk_size=TITANS_CHUNK)),
    ]
    return [(name, fn, fn) for name, fn in fixed] + own


def layer_cases(B, H, K):
    """(name, step, fresh) per layer: `step` decodes one token with its cache (after a prefill of PREFILL tokens),
    advancing it (both modes time the same kind of step); `fresh` decodes that token from a copy of the cache."""
    hidden = H * K
    dims = dict(hidden_size=hidden, num_heads=H, expand_k=1.0, expand_v=1.0, layer_idx=0, backend="torch")
    layers = [
        ("LinearAttention", LinearAttention(**dims)),
        ("GatedLinearAttention", GatedLinearAttention(**dims)),
        ("DeltaNet (short conv)", DeltaNet(**dims)),
        ("GatedDeltaNet (short conv)", GatedDeltaNet(**dims)),
        ("TTTLinear b=16", TTTLinear(hidden_size=hidden, num_heads=H, mini_batch_size=MINI_BATCH, layer_idx=0,
                                       backend="torch")),
        ("TTTMLP b=16", TTTMLP(hidden_size=hidden, num_heads=H, mini_batch_size=MINI_BATCH, expand=TTT_MLP_EXPAND,
                               layer_idx=0, backend="torch")),
        ("TitansMemory (short conv)", TitansMemory(hidden_size=hidden, num_heads=H, layer_idx=0, backend="torch")),
    ]
    cases = []
    for name, layer in layers:
        layer.eval()
        with torch.no_grad():
            _, _, cache = layer(torch.randn(B, PREFILL, hidden), use_cache=True)
        x = torch.randn(B, 1, hidden)

        def step(lyr=layer, c=cache, x=x, fresh=False):  # fresh: from a copy of the cache, to compare outputs
            return lyr(x, past_key_values=c.snapshot() if fresh else c, use_cache=True)[0]

        cases.append((name, step, lambda step=step: step(fresh=True)))
    return cases


def same_output(level, name, B, fused_fn, eager_fn) -> float:
    """Rel. RMS of the fused output against the eager one on the same inputs and state; exits when they differ
    (fp32 both ways: a mismatch means a wrong dispatch, not rounding)."""
    with torch.no_grad():
        fused = fused_fn()
        with eager():
            ref = eager_fn()
    err = float((fused.double() - ref.double()).norm() / ref.double().norm())
    if not err <= 1e-4:
        sys.exit(f"bench/decode.py: {level} {name} B={B}: fused output differs from eager (rel RMS {err:.1e})")
    return err


def measure(level, name, B, fused_fn, eager_fn, min_run_time):
    with torch.no_grad():
        fused_s = median_seconds(fused_fn, min_run_time)[0]
        with eager():
            eager_s = median_seconds(eager_fn, min_run_time)[0]
    return dict(level=level, case=name, B=B, fused_ms=fused_s * 1e3, eager_ms=eager_s * 1e3,
                fused_tok_s=B / fused_s, eager_tok_s=B / eager_s, speedup=eager_s / fused_s)


def markdown(rows, meta):
    lines = [
        f"Decode on CPU, one token per call: {meta['machine']}; torch {meta['torch']}, {meta['threads']} thread(s); "
        f"H = {meta['H']}, K = V = {meta['K']}. Fused = the C++ step of `ipl_layers._C`; eager = the same call "
        "with the extension switched off (the ops' torch path on one token). A step decodes one token of each of "
        "the B sequences (tokens/s = B / step); medians of `torch.utils.benchmark`.",
        "",
        "| level | case | B | fused ms/step | eager ms/step | fused tok/s | eager tok/s | eager / fused |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['level']} | {r['case']} | {r['B']} | {r['fused_ms']:.4f} | {r['eager_ms']:.4f} | "
                     f"{r['fused_tok_s']:.0f} | {r['eager_tok_s']:.0f} | {r['speedup']:.1f}x |")
    lines += ["", target_line(rows)]
    return "\n".join(lines) + "\n"


def target_line(rows):
    layers = [r for r in rows if r["level"] == "layer" and r["B"] == 1]
    if not layers:
        return f"Target (fused >= {TARGET:.0f}x eager per layer at B = 1): not measured (no B = 1 layer rows)."
    missed = [f"{r['case']} ({r['speedup']:.1f}x)" for r in layers if r["speedup"] < TARGET]
    if not missed:
        return f"Target (fused >= {TARGET:.0f}x eager per layer at B = 1): met by every layer."
    return f"Target (fused >= {TARGET:.0f}x eager per layer at B = 1): NOT met by " + ", ".join(missed) + "."


def selected(cases, only):
    """The cases whose name (first field) contains one of the `only` strings; all without `only`."""
    return [c for c in cases if only is None or any(s in c[0] for s in only)]


def main(argv=None):
    args = parse_args(argv)
    if not _ext.available():
        sys.exit("bench/decode.py: ipl_layers._C is not built; run `python setup.py build_ext --inplace` first")
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]  # the machine may be shared: its load is reported with the timings
    torch.manual_seed(0)
    rows = []
    for B in args.batch:
        for name, step, fresh in selected(op_cases(B, args.H, args.K), args.only):
            err = same_output("op", name, B, fresh, fresh)
            row = dict(measure("op", name, B, step, step, args.min_run_time), rel_rms_vs_eager=err)
            rows.append(row)
            print(f"op    {name:28s} B={B:<3d} fused {row['fused_ms']:.4f} ms  eager {row['eager_ms']:.4f} ms  "
                  f"{row['speedup']:.1f}x", flush=True)
        for name, step, fresh in selected(layer_cases(B, args.H, args.K), args.only):
            err = same_output("layer", name, B, fresh, fresh)
            row = dict(measure("layer", name, B, step, step, args.min_run_time), rel_rms_vs_eager=err)
            rows.append(row)
            print(f"layer {name:28s} B={B:<3d} fused {row['fused_ms']:.4f} ms  eager {row['eager_ms']:.4f} ms  "
                  f"{row['speedup']:.1f}x", flush=True)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                machine=f"{os.cpu_count()} CPU cores, 1-min load average {load_start:.1f} at start, "
                f"{os.getloadavg()[0]:.1f} at end",
                torch=torch.__version__, threads=args.threads, H=args.H, K=args.K, min_run_time=args.min_run_time)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown(rows, meta))
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, target=target_line(rows), rows=rows), indent=1))
    print(target_line(rows))


if __name__ == "__main__":
    main()
