"""Tiny models trained side by side on the embedded stdlib byte corpus, equal steps and data, then compared:
validation bits per byte, mean loss per range of positions (from the per-position eval, at lengths far beyond
the training length), the cache size and greedy tokens/s when decoding at a long context, MQAR accuracy.

    python bench/train_compare.py memory_attention   # issue 10: full attention, sliding window, memory attention
    python bench/train_compare.py pretraining        # issue 7: the demo hybrid, attention, Gated DeltaNet
    python bench/train_compare.py memory_attention --steps 5 --eval-len 128 --decode-context 64 --out /tmp/x
                                                     # seconds: checks the harness, claims nothing

Every model shares the preset's width, depth, heads, feed-forward (the pretraining preset: the demo's Memory+ at
layer 2 in all three) and training options; only the mixers differ.
Training runs through `ipl_layers.models.train` (its checkpoints go under <out>_runs/); a finished run is
evaluated again, not retrained. Writes <out>.md (table), <out>.json (raw numbers) and <out>_curves/ (the
per-position loss of every model as CSV and PNG, log-spaced bins).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers, as when run as a script
from timing import decode_tokens_per_second  # noqa: E402

from ipl_layers.cache import FastWeightCache  # noqa: E402
from ipl_layers.models.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from ipl_layers.models.evaluate import per_position_loss, write_outputs  # noqa: E402
from ipl_layers.models.train import build_model, train  # noqa: E402
from ipl_layers.models.train_mqar import train_mqar, write_results  # noqa: E402
from ipl_layers.models.train_config import TrainConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BASE_MODEL = dict(hidden_size=128, num_hidden_layers=4, num_heads=4)
BASE_TRAIN = dict(seq_len=256, batch_size=8, lr=3e-3, warmup_steps=30, eval_sequences=16, log_every=50)
WINDOW = 64

PRESETS = {
    # issue 10: what the memory of the evicted tokens buys over the window alone, per memory type
    "memory_attention": {
        "models": {
            "attention": dict(mixers="attn*4"),
            "sliding_window": dict(mixers="swa*4"),
            **{f"memory_{memory}": dict(mixers="memory_attention*4", mixer_kwargs={"memory_attention": {
                "memory": memory}}) for memory in ("gated_deltanet", "delta_rule", "linear_attention", "ttt_linear",
                                                    "titans")},
        },
        "steps": 300, "eval_len": 2048, "ranges": [(1, 64), (64, 256), (256, 1024), (1024, 2048)],
        "decode_context": 8192,
    },
    # issue 7: the demo hybrid against its pure attention and pure Gated DeltaNet counterparts
    "pretraining": {
        "models": {
            "hybrid": dict(mixers="swa,ttt_linear,swa,gated_deltanet",
                           mixer_kwargs={"ttt_linear": {"mini_batch_size": 16}}),
            "attention": dict(mixers="attn*4"),
            "gated_deltanet": dict(mixers="gated_deltanet*4"),
        },
        "base": dict(ffn={"memory_layers": [2], "kwargs": {"memory_plus": {"num_heads": 2, "num_keys": 32,
                                                                            "topk": 8, "key_dim": 32}}}),
        "steps": 800, "eval_len": 8192, "ranges": [(1, 256), (256, 512), (512, 2048), (2048, 8192)],
        "points": [512, 2048, 8192], "decode_context": None,
        # each model trained again from scratch on MQAR (Zoology's setting: vocab 8192, 8-64 pairs at length 256),
        # scored at length 1024 with 64 and 256 pairs
        "mqar": dict(steps=600, seq_len=256, batch_size=16, lr=3e-3, train_kv_pairs=(8, 16, 32, 64),
                     eval_seq_len=1024, eval_kv_pairs=(64, 256), vocab_size=8192),
    },
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, help="training steps (default: the preset's)")
    p.add_argument("--eval-len", type=int, help="per-position eval length (default: the preset's)")
    p.add_argument("--eval-sequences", type=int, default=8)
    p.add_argument("--decode-context", type=int, help="decode at this context (default: the preset's)")
    p.add_argument("--decode-runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="+", help="train and evaluate only these models of the preset")
    p.add_argument("--no-mqar", action="store_true", help="skip the preset's MQAR training and accuracy")
    p.add_argument("--out", help="output path without suffix (default: bench/results/train_<preset>)")
    return p.parse_args(argv)


def cache_bytes(cache: FastWeightCache) -> int:
    total = 0
    for i in range(len(cache)):
        for name, value in cache[i].items():
            if name != "seen_tokens":
                total += sum(t.numel() * t.element_size() for t in (value if isinstance(value, tuple) else (value,)))
    return total


def decode_figures(config: TrainConfig, checkpoint: str, context: int, runs: int) -> dict:
    """The cache size after a `context`-token prompt and greedy tokens/s from there (batch 1)."""
    model = build_model(config)
    load_checkpoint(checkpoint, model)
    model.eval()
    with torch.no_grad():
        cache = FastWeightCache()
        model(torch.randint(0, 256, (1, context)), cache=cache, use_cache=True)
    return {"cache_mib": cache_bytes(cache) / 2**20,
            **decode_tokens_per_second(model, context, model.config.vocab_size, runs)}


def mqar_figures(model: dict, settings: dict, steps, out_dir: Path) -> dict:
    """MQAR accuracy {num_kv_pairs: accuracy} of the model trained on MQAR alone (read back when already run)."""
    done = out_dir / "mqar.json"
    if not done.exists():
        config = TrainConfig(model=model, steps=steps or settings["steps"], seq_len=settings["seq_len"],
                             batch_size=settings["batch_size"], lr=settings["lr"], warmup_steps=50,
                             eval_sequences=32, log_every=50, out_dir=str(out_dir))
        record = train_mqar(config, settings["vocab_size"], settings["train_kv_pairs"], (settings["eval_seq_len"],),
                            settings["eval_kv_pairs"])
        write_results(record, str(out_dir))
    results = json.loads(done.read_text())["results"]
    return {str(r["num_kv_pairs"]): r["accuracy"] for r in results}


def range_means(curve: np.ndarray, ranges) -> dict:
    """Mean loss over positions [lo, hi) (1-based: curve[p - 1] is the loss at position p)."""
    return {f"{lo}-{hi}": float(curve[lo - 1: hi - 1].mean()) for lo, hi in ranges if hi - 1 <= len(curve)}


def run_model(name: str, spec: dict, preset: dict, args, runs_dir: Path) -> dict:
    model = {**BASE_MODEL, "window_size": WINDOW, **preset.get("base", {}), **spec}
    config = TrainConfig(model=model, steps=args.steps or preset["steps"], out_dir=str(runs_dir / name),
                         eval_every=10 ** 9, save_every=10 ** 9, eval_seq_len=args.eval_len or preset["eval_len"],
                         **BASE_TRAIN)
    started = time.perf_counter()
    result = train(config, resume=latest_checkpoint(config.out_dir) is not None)
    checkpoint = latest_checkpoint(config.out_dir)
    row = {"params": sum(p.numel() for p in build_model(config).parameters()), "val_bits": result["val_bits"],
           "train_s": time.perf_counter() - started}
    curve = per_position_loss(checkpoint, config.eval_seq_len, args.eval_sequences, batch_size=2)
    row["ranges"] = range_means(curve, preset["ranges"])
    row["points"] = {str(p): float(curve[max(0, p - 16): p].mean()) for p in preset.get("points", [])
                     if p <= len(curve)}
    if "mqar" in preset and not args.no_mqar:
        row["mqar"] = mqar_figures(model, preset["mqar"], args.steps, runs_dir / f"{name}_mqar")
    context = args.decode_context or preset["decode_context"]
    if context:
        row["decode"] = decode_figures(config, checkpoint, context, args.decode_runs)
    return row, curve


def markdown(preset_name: str, preset: dict, info: dict, rows: dict) -> str:
    ranges = list(next(iter(rows.values()))["ranges"])
    points = list(next(iter(rows.values()))["points"])
    header = ["model", "params", "val bits/byte"] + [f"loss {r}" for r in ranges] + [f"loss @{p}" for p in points]
    mqar = list(next(iter(rows.values())).get("mqar", {}))
    header += [f"MQAR {p} pairs" for p in mqar]
    decode = "decode" in next(iter(rows.values()))
    if decode:
        header += [f"cache MiB @{info['decode_context']}", "decode tok/s"]
    lines = [f"# {preset_name}: {info['steps']} steps of {BASE_TRAIN['batch_size']} x {BASE_TRAIN['seq_len']} "
             f"bytes, CPU ({info['threads']} threads, load before {info['load_before']}, after {info['load_after']})",
             "", f"Per-position loss (nats) over {info['eval_sequences']} validation windows of {info['eval_len']} "
             f"bytes (loss @p: positions p-15..p); window {WINDOW} for the sliding-window and memory-attention layers.",
             "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in rows.items():
        cells = [name, f"{row['params'] / 1e6:.2f}M", f"{row['val_bits']:.3f}"]
        cells += [f"{row['ranges'][r]:.3f}" for r in ranges] + [f"{row['points'][p]:.3f}" for p in points]
        cells += [f"{row['mqar'][p]:.3f}" for p in mqar]
        if decode:
            cells += [f"{row['decode']['cache_mib']:.2f}", f"{row['decode']['tokens_per_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    out = Path(args.out or ROOT / "bench" / "results" / f"train_{args.preset}")
    runs_dir = out.parent / f"{out.name}_runs"
    load_before = os.getloadavg()
    rows, curves = {}, {}
    for name, spec in preset["models"].items():
        if args.only and name not in args.only:
            continue
        rows[name], curves[name] = run_model(name, spec, preset, args, runs_dir)
    info = {"threads": torch.get_num_threads(), "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()], "steps": args.steps or preset["steps"],
            "eval_len": args.eval_len or preset["eval_len"], "eval_sequences": args.eval_sequences,
            "decode_context": args.decode_context or preset["decode_context"], "args": vars(args)}
    table = markdown(args.preset, preset, info, rows)
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table)
    out.with_suffix(".json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    write_outputs(curves, str(out.parent / f"{out.name}_curves"))


if __name__ == "__main__":
    main()
