"""`ipl-eval` / `python -m ipl_layers.models.evaluate`: per-position validation loss over long sequences, the TTT
paper's plot (does the loss keep falling as the context grows?), for one or more checkpoints side by side.

    ipl-eval runs/demo                                   # the run's latest checkpoint
    ipl-eval runs/a runs/b/step-00000200 --seq_len=2048 --out=runs/compare
    ipl-eval passkey runs/demo --lengths=256,1024,4096   # passkey retrieval (passkey.py)
    ipl-eval mqar --config=demo --steps=2000             # train and score on MQAR (train_mqar.py)

Writes `<out>/per_position.csv` (position, then the mean loss in nats of every checkpoint at that position) and
`<out>/per_position.png` (the same, averaged over log-spaced position bins so the curve is readable), and prints
the mean loss per context range. Each checkpoint is read on its own run's validation split, through its run's
tokenizer for a tokenizer run. A first argument "passkey" or "mqar" names a subcommand (a run folder of that
name is "./mqar").
"""

import argparse
import csv
import importlib
import math
import os
import sys
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ipl_layers.models.checkpoint import latest_checkpoint, load_checkpoint, read_trainer_state
from ipl_layers.models.data import eval_batches
from ipl_layers.models.tokenizer import check_tokenizer_unchanged
from ipl_layers.models.train import build_model, load_data, resolve_device
from ipl_layers.models.train_config import TrainConfig

# modules imported when named: passkey.py builds on this module (load_run), so it cannot be imported above
SUBCOMMANDS = {"passkey": "ipl_layers.models.passkey", "mqar": "ipl_layers.models.train_mqar"}


def resolve_checkpoint(path: str) -> str:
    """A run folder -> its latest checkpoint; a checkpoint folder -> itself."""
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    if os.path.isfile(os.path.join(path, "manifest.json")):
        return path
    raise FileNotFoundError(f"checkpoint: expected a run folder with a 'latest' file or a checkpoint folder, "
                            f"got {path!r}")


def load_run(checkpoint: str, device: torch.device):
    """(config, model, validation tokens, byte_level): the checkpoint's model on `device` in eval mode, and its run's
    validation split, tokenized as in training (the token cache of its run folder is reused)."""
    state = read_trainer_state(checkpoint)
    config = TrainConfig(**state["config"])
    if config.tokenizer is not None:
        check_tokenizer_unchanged(config.tokenizer, state.get("tokenizer_sha256"), checkpoint)
    _, val_tokens, byte_level = load_data(config, os.path.dirname(os.path.normpath(checkpoint)))
    model = build_model(config, byte_level)
    load_checkpoint(checkpoint, model)
    return config, model.to(device).eval(), val_tokens, byte_level


@torch.no_grad()
def per_position_loss(checkpoint: str, seq_len: int, sequences: int, batch_size: int = 4,
                      device: str = "auto") -> np.ndarray:
    """[seq_len] mean next-token loss (nats) at each position 1..seq_len over `sequences` validation windows."""
    target = resolve_device(device)
    _, model, val_tokens, _ = load_run(checkpoint, target)
    total = torch.zeros(seq_len, dtype=torch.float64)
    for ids in eval_batches(val_tokens, sequences, seq_len + 1, batch_size):
        ids = ids.to(target)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=target.type == "cuda"):
            logits = model(ids[:, :-1], use_cache=False).logits  # [b, seq_len, V]
        loss = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")  # [b, seq_len]
        total += loss.sum(0).double().cpu()
    return (total / sequences).numpy()


def log_bins(length: int, per_octave: int = 4) -> List[range]:
    """Index ranges of positions 1..length whose edges grow geometrically (1, 2, 3, 4, 5, 6, 8, ...): equal widths
    on a log axis, each bin averaging more positions as single positions get fewer samples' worth of signal."""
    geometric = {round(2 ** (i / per_octave)) for i in range(int(per_octave * math.log2(max(length, 1))) + 1)}
    edges = sorted({e for e in geometric if e < length} | {1, length + 1})  # the last bin is never a lone position
    return [range(a - 1, b - 1) for a, b in zip(edges, edges[1:])]


def write_outputs(curves: Dict[str, np.ndarray], out: str) -> Dict[str, str]:
    """per_position.csv and per_position.png under `out`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training machine
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    paths = {"csv": os.path.join(out, "per_position.csv"), "png": os.path.join(out, "per_position.png")}
    names, length = list(curves), len(next(iter(curves.values())))
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["position"] + names)
        for t in range(length):
            writer.writerow([t + 1] + [f"{curves[n][t]:.6f}" for n in names])
    bins = log_bins(length)
    centers = [(b.start + b.stop + 1) / 2 for b in bins]  # positions are 1-based, bins index 0-based
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names:
        ax.plot(centers, [curves[name][b.start:b.stop].mean() for b in bins], marker=".", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the sequence (1 + tokens of context)")
    ax.set_ylabel("validation loss (nats), mean over the bin")
    ax.set_title("Per-position validation loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=110)
    plt.close(fig)
    return paths


def summary(curves: Dict[str, np.ndarray]) -> str:
    """Mean loss per context range [1, 16), [16, 64), ... per checkpoint: a table for the terminal."""
    length = len(next(iter(curves.values())))
    edges = [1] + [e for e in (16, 64, 256, 1024, 4096, 16384) if e < length] + [length + 1]
    header = "checkpoint".ljust(40) + "".join(f"{f'[{a},{b})':>14}" for a, b in zip(edges, edges[1:]))
    rows = [name[-40:].ljust(40) + "".join(f"{c[a - 1:b - 1].mean():>14.4f}" for a, b in zip(edges, edges[1:]))
            for name, c in curves.items()]
    return "\n".join(["validation loss (nats) by position range", header] + rows)


def label(checkpoint: str) -> str:
    """"<run folder name>/step-<n>": short, and distinct across runs and steps."""
    path = os.path.normpath(os.path.abspath(checkpoint))
    return f"{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}"


def main(argv: Optional[List[str]] = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    parser = argparse.ArgumentParser(prog="ipl-eval", description=__doc__.split("\n\n")[0],
                                     epilog=f"subcommands: {', '.join(SUBCOMMANDS)} (ipl-eval <name> --help)")
    parser.add_argument("checkpoints", nargs="+", help="run folders (their latest checkpoint) or checkpoint folders")
    parser.add_argument("--seq_len", type=int, default=None, help="default: the first run's eval_seq_len")
    parser.add_argument("--sequences", type=int, default=64, help="validation windows averaged per position")
    parser.add_argument("--out", default=None, help="output folder (default: <first checkpoint's run>/eval)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    paths = [resolve_checkpoint(p) for p in args.checkpoints]
    seq_len = args.seq_len or read_trainer_state(paths[0])["config"]["eval_seq_len"]
    curves = {label(p): per_position_loss(p, seq_len, args.sequences, device=args.device) for p in paths}
    files = write_outputs(curves, args.out or os.path.join(os.path.dirname(paths[0]), "eval"))
    print(summary(curves))
    print(f"wrote {files['csv']} and {files['png']}")


if __name__ == "__main__":
    main()
