"""CPU tokens/s of a hybrid IPL model against a same-size attention-only model, in one run:
forward+backward at each `--T`, and greedy decoding after a prompt of `--decode-context` tokens: the hybrid with
the fused C++ decode steps (the default on CPU) and with the ops' eager torch path, the attention model with its
KV cache, and a transformers `Mamba2ForCausalLM` of the same width and depth (its CPU reference path: no
mamba_ssm kernels on CPU).

    python bench/models.py                 # the issue's sizes: ~20M parameters, T = 2048 and 8192, decode at 8192
    python bench/models.py --T 256 --decode-context 256 --hidden 64 --layers 4 --vocab 256 --min-run-time 0.01 \\
        --out /tmp/smoke                   # seconds: checks the harness, claims nothing

The hybrid repeats `--hybrid` (default: sliding-window attention, TTT-Linear, sliding-window attention, Gated
DeltaNet) with a Memory+ feed-forward in its middle layer; the baseline has full attention in every layer and
SwiGLU everywhere, with the same width, heads, depth and vocabulary (the table gives both parameter counts: the
memory table's rows are read sparsely, k per head and token). Prints a markdown table and writes it with
the raw numbers to <out>.md and <out>.json; the load averages show whether other processes shared the cores.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers, as when run as a script
from decode import eager  # noqa: E402
from timing import decode_tokens_per_second, median_seconds  # noqa: E402

from ipl_layers.models import IPLConfig, IPLForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[2048, 8192], help="forward+backward lengths")
    p.add_argument("--decode-context", type=int, default=8192, help="prompt length before the timed decoding")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--window", type=int, default=512, help="window of the hybrid's sliding-window layers")
    p.add_argument("--hybrid", default="swa,ttt_linear,swa,gated_deltanet", help="repeated to --layers")
    p.add_argument("--memory-keys", type=int, default=64, help="sub-keys of the Memory+ layer (n^2 value rows)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds per forward+backward timing")
    p.add_argument("--decode-runs", type=int, default=5, help="timed decoding runs (median)")
    p.add_argument("--decode-only", action="store_true", help="skip the forward+backward timings")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "models"), help="output path without suffix")
    return p.parse_args(argv)


def build(args, mixers, memory_layers):
    torch.manual_seed(0)
    memory = {"num_keys": args.memory_keys, "topk": min(32, args.memory_keys)}
    config = IPLConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                       num_heads=args.heads, window_size=args.window, mixers=mixers,
                       ffn={"memory_layers": memory_layers, "kwargs": {"memory_plus": memory}})
    return IPLForCausalLM(config)


def models(args):
    unit = args.hybrid.split(",")
    hybrid = (unit * -(-args.layers // len(unit)))[: args.layers]
    return {"hybrid": build(args, hybrid, [args.layers // 2]), "attention": build(args, ["attn"] * args.layers, [])}


def mamba2(args):
    """transformers' Mamba2 with the same width, depth and vocabulary: heads of 64 channels (expand 2), state 64."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    config = Mamba2Config(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                          num_heads=2 * args.hidden // 64, head_dim=64, state_size=64, n_groups=1, expand=2)
    return Mamba2ForCausalLM(config).eval()


def decode_rows(args, built):
    """Greedy decoding tokens/s after `decode_context` tokens, per model (and the hybrid without the C++ steps)."""
    rows = {name: decode_tokens_per_second(m, args.decode_context, args.vocab, args.decode_runs)
            for name, m in built.items()}
    with eager():
        rows["hybrid (eager torch steps)"] = decode_tokens_per_second(built["hybrid"], args.decode_context, args.vocab,
                                                                       args.decode_runs)
    peer = mamba2(args)
    rows["mamba2 (transformers)"] = {**decode_tokens_per_second(peer, args.decode_context, args.vocab,
                                                                args.decode_runs),
                                     "params": sum(p.numel() for p in peer.parameters())}
    return rows


def train_tokens_per_second(model, T, vocab, min_run_time):
    model.train()
    ids = torch.randint(0, vocab, (1, T))

    def step():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids, use_cache=False).loss.backward()

    median, iqr, calls = median_seconds(step, min_run_time)
    return {"tokens_per_s": T / median, "median_s": median, "iqr_s": iqr, "calls": calls}


def markdown(info, rows):
    lines = [f"# Hybrid vs attention, CPU ({info['threads']} threads, load before {info['load_before']}, "
             f"after {info['load_after']})", "",
             f"hybrid: {info['hybrid']} ({info['params']['hybrid'] / 1e6:.1f}M parameters); attention: "
             f"{info['params']['attention'] / 1e6:.1f}M parameters", ""]
    if rows:
        lines += ["| pass | T | hybrid tok/s | attention tok/s | hybrid / attention |", "|---|---|---|---|---|"]
    for row in rows:
        h, a = row["hybrid"]["tokens_per_s"], row["attention"]["tokens_per_s"]
        lines.append(f"| {row['pass']} | {row['T']} | {h:,.0f} | {a:,.0f} | {h / a:.2f}x |")
    decode = info["decode"]
    lines += ["", f"Greedy decoding, batch 1, after {info['args']['decode_context']} tokens:", "",
              "| model | tok/s | vs attention |", "|---|---|---|"]
    for name, r in decode.items():
        name = f"{name}, {r['params'] / 1e6:.1f}M parameters" if "params" in r else name
        lines.append(f"| {name} | {r['tokens_per_s']:,.1f} | "
                     f"{r['tokens_per_s'] / decode['attention']['tokens_per_s']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    built = models(args)
    load_before = os.getloadavg()
    rows = []
    for T in [] if args.decode_only else args.T:
        rows.append({"pass": "fwd+bwd", "T": T, **{name: train_tokens_per_second(m, T, args.vocab, args.min_run_time)
                                                    for name, m in built.items()}})
    decode = decode_rows(args, built)
    info = {"decode": decode, "threads": torch.get_num_threads(), "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()], "hybrid": built["hybrid"].config.mixers,
            "params": {name: sum(p.numel() for p in m.parameters()) for name, m in built.items()},
            "args": vars(args)}
    table = markdown(info, rows)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table)
    out.with_suffix(".json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
