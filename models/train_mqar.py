"""`ipl-eval mqar` / `python -m ipl_layers.models.train_mqar`: trains a model config on freshly generated MQAR
batches (mqar.py) and reports its recall accuracy on a grid of sequence lengths and key-value pair counts.

    ipl-eval mqar --config=demo --steps=2000 --out_dir=runs/mqar-demo
    ipl-eval mqar --config=demo --model.mixers=swa*4 --vocab_size=8192 --train_kv_pairs=8,16,32,64 \\
        --eval_seq_lens=512,1024 --eval_kv_pairs=64,256 --out_dir=runs/mqar-swa

The model and optimizer come from the same config and overrides as `ipl-train` (train_config.py): its `model`,
`seq_len` (of the training rows), `batch_size`, `grad_accum`, `steps`, the AdamW settings and schedule, `seed`,
`eval_sequences` (rows scored per grid point) and `out_dir`; the data keys are not used. Training step s draws rows
with `train_kv_pairs[s % n]` pairs from `numpy.random.default_rng([seed, 0, s, micro])`, and each grid point its
rows from `default_rng([seed, 1, seq_len, num_kv_pairs])`, so a seed gives the same losses and accuracies on the
same machine. Grid points too short for their pairs (seq_len < 4 * num_kv_pairs) are left out and listed.
Writes `<out_dir>/mqar.json` (settings, the logged train losses, the accuracies, the points left out) and
`<out_dir>/mqar.csv` (seq_len, num_kv_pairs, rows, accuracy); nothing else, no checkpoints.
"""

import argparse
import csv
import json
import os
import sys
from typing import List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ipl_layers.models.mqar import mqar_accuracy, mqar_batch
from ipl_layers.models.train import build_optimizer, model_with_vocab, resolve_device
from ipl_layers.models.train_config import TrainConfig, parse_config


def _check_pairs(name: str, pairs: Sequence[int], vocab_size: int):
    if not pairs or any(p < 1 or p > vocab_size // 2 - 1 for p in pairs):
        raise ValueError(f"{name}: expected a non-empty list of pair counts in 1..{vocab_size // 2 - 1} (distinct "
                         f"keys below vocab_size / 2 = {vocab_size // 2}), got {list(pairs)}")


def train_mqar(config: TrainConfig, vocab_size: int = 8192, train_kv_pairs: Sequence[int] = (8, 16, 32, 64),
               eval_seq_lens: Sequence[int] = (512, 1024), eval_kv_pairs: Sequence[int] = (64, 256)) -> dict:
    """Trains `config`'s model on MQAR for `config.steps` steps, then scores every (seq_len, num_kv_pairs) of the
    grid; returns the record mqar.json holds (see the module docstring)."""
    _check_pairs("train_kv_pairs", train_kv_pairs, vocab_size)
    _check_pairs("eval_kv_pairs", eval_kv_pairs, vocab_size)
    if max(train_kv_pairs) * 4 > config.seq_len:
        raise ValueError(f"train_kv_pairs: {max(train_kv_pairs)} pairs and their queries need seq_len >= "
                         f"{4 * max(train_kv_pairs)}, got seq_len = {config.seq_len}")
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = model_with_vocab(config, vocab_size, f"MQAR with vocab_size = {vocab_size}").to(device).train()
    optimizer, scheduler = build_optimizer(model, config)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    losses = []
    bar = tqdm(range(config.steps), desc="mqar", unit="step", dynamic_ncols=True)
    for step in bar:
        pairs, loss_sum = train_kv_pairs[step % len(train_kv_pairs)], 0.0
        for micro in range(config.grad_accum):
            rng = np.random.default_rng([config.seed, 0, step, micro])
            ids, labels = (t.to(device) for t in mqar_batch(rng, config.batch_size, config.seq_len, pairs, vocab_size))
            with autocast:
                loss = model(ids, labels=labels, use_cache=False).loss / config.grad_accum
            loss.backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        bar.set_postfix(loss=f"{loss_sum:.3f}", kv=pairs)
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            losses.append({"step": step + 1, "num_kv_pairs": pairs, "loss": loss_sum})
    bar.close()
    model.eval()
    results, left_out = [], []
    for seq_len in eval_seq_lens:
        for pairs in eval_kv_pairs:
            if seq_len < 4 * pairs:
                left_out.append({"seq_len": seq_len, "num_kv_pairs": pairs})
                continue
            rng = np.random.default_rng([config.seed, 1, seq_len, pairs])
            correct = 0.0
            for start in range(0, config.eval_sequences, config.batch_size):
                rows = min(config.batch_size, config.eval_sequences - start)
                ids, labels = (t.to(device) for t in mqar_batch(rng, rows, seq_len, pairs, vocab_size))
                with autocast:
                    correct += mqar_accuracy(model, ids, labels) * rows  # every row asks `pairs` queries
            results.append({"seq_len": seq_len, "num_kv_pairs": pairs, "rows": config.eval_sequences,
                            "accuracy": correct / config.eval_sequences})
    return {"config": vars(config), "vocab_size": vocab_size, "train_kv_pairs": list(train_kv_pairs),
            "train_losses": losses, "results": results, "left_out": left_out}


def write_results(record: dict, out_dir: str) -> List[str]:
    """mqar.json and mqar.csv under `out_dir`; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "mqar.json"), os.path.join(out_dir, "mqar.csv")]
    with open(paths[0], "w") as f:
        json.dump(record, f, indent=1)
    with open(paths[1], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["seq_len", "num_kv_pairs", "rows", "accuracy"])
        for r in record["results"]:
            writer.writerow([r["seq_len"], r["num_kv_pairs"], r["rows"], f"{r['accuracy']:.6f}"])
    return paths


def _int_list(text: str) -> List[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def main(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(prog="ipl-eval mqar", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     epilog="other --key=value arguments are ipl-train's config and overrides")
    parser.add_argument("--vocab_size", type=int, default=8192, help="MQAR vocabulary: keys below half, values above")
    parser.add_argument("--train_kv_pairs", type=_int_list, default=[8, 16, 32, 64],
                        help="pair counts of the training rows, one per step in turn (default 8,16,32,64)")
    parser.add_argument("--eval_seq_lens", type=_int_list, default=[512, 1024], help="default 512,1024")
    parser.add_argument("--eval_kv_pairs", type=_int_list, default=[64, 256], help="default 64,256")
    args, config_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    config = parse_config(config_args)
    record = train_mqar(config, args.vocab_size, args.train_kv_pairs, args.eval_seq_lens, args.eval_kv_pairs)
    paths = write_results(record, config.out_dir)
    for r in record["results"]:
        print(f"seq_len {r['seq_len']:>6}  kv pairs {r['num_kv_pairs']:>5}  accuracy {r['accuracy']:.4f}")
    for r in record["left_out"]:
        print(f"seq_len {r['seq_len']:>6}  kv pairs {r['num_kv_pairs']:>5}  left out: seq_len < 4 * pairs")
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
