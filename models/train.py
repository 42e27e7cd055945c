"""`ipl-train` / `python -m ipl_layers.models.train`: pretrains an `IPLForCausalLM` (see train_config.py for the
config and its overrides, data.py for the data, checkpoint.py for the checkpoints).

    ipl-train --config=demo                       # the tiny CPU hybrid on the embedded stdlib byte corpus
    ipl-train --config=125m --data=tokens.bin --model.vocab_size=50304 --out_dir=runs/125m
    ipl-train --config=demo --resume              # continue runs/demo from its latest checkpoint
    ipl-train --config=demo --data=texts/ --tokenizer=tokenizers/gpt2 --out_dir=runs/gpt2-demo

AdamW with the memory layers' value tables in their own group (`memory_parameter_groups`), linear warmup then a
cosine to `lr * min_lr_ratio`, global-norm gradient clipping, gradient accumulation, bf16 autocast on CUDA.
A resumed run continues exactly: weights, optimizer, scheduler and RNG states come from the checkpoint and the
batches are a function of (seed, step), so on CPU its losses equal the uninterrupted run's bit for bit.
Logs go to `<out_dir>/log.jsonl` (one JSON object per record) and a tqdm bar (loss, tokens/s, ETA).
With `--tokenizer=DIR` the text is tokenized by that local `transformers` tokenizer (tokenizer.py), the model's
vocab_size comes from it, and checkpoints record its path (in the config) and the sha256 of its files.
"""

import contextlib
import json
import math
import os
import sys
import time
from typing import List, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ipl_layers.layers.memory import memory_parameter_groups
from ipl_layers.models import fsdp
from ipl_layers.models.checkpoint import latest_checkpoint, load_checkpoint, read_trainer_state, save_checkpoint
from ipl_layers.models.configuration_ipl import IPLConfig
from ipl_layers.models.data import BYTE_VOCAB, eval_batches, load_splits, train_batch
from ipl_layers.models.modeling_ipl import IPLForCausalLM
from ipl_layers.models.tokenizer import (check_tokenizer_unchanged, load_tokenizer, tokenized_splits,
                                        tokenizer_digest)
from ipl_layers.models.train_config import TrainConfig, parse_config

# config keys a resumed run must share with its checkpoint: they define the model and the batches seen so far
RESUME_FIXED = ("model", "data", "tokenizer", "token_dtype", "val_fraction", "seed", "seq_len", "batch_size",
                "grad_accum", "parallel")


def build_model(config: TrainConfig, byte_level: bool = True) -> IPLForCausalLM:
    """The config's model for its data: the tokenizer's vocabulary, else bytes (`byte_level`), else (a token file)
    the config's vocab_size."""
    if config.tokenizer is not None:
        vocab = len(load_tokenizer(config.tokenizer))
        return model_with_vocab(config, vocab, f"the tokenizer {config.tokenizer!r} ({vocab} tokens)")
    return model_with_vocab(config, BYTE_VOCAB if byte_level else None, "byte-level data")


def model_with_vocab(config: TrainConfig, vocab: Optional[int], source: str) -> IPLForCausalLM:
    """The config's model with `vocab_size` defaulting to the data's `vocab`; a config may set a larger one (padded
    to a multiple of 64, say) but not a smaller one. `source` names the data in the error."""
    model_kwargs = dict(config.model)
    if vocab is not None:
        model_kwargs.setdefault("vocab_size", vocab)
        if model_kwargs["vocab_size"] < vocab:
            raise ValueError(f"model.vocab_size: {source} needs >= {vocab}, got {model_kwargs['vocab_size']}")
    return IPLForCausalLM(IPLConfig(**model_kwargs))


def load_data(config: TrainConfig, cache_dir: str):
    """(train, validation, byte_level) of the config's data, through its tokenizer when it names one (the token
    arrays cached in `cache_dir`)."""
    if config.tokenizer is None:
        return load_splits(config.data, config.val_fraction, config.token_dtype)
    return (*tokenized_splits(config.data, config.val_fraction, config.tokenizer, cache_dir), False)


def build_optimizer(model: IPLForCausalLM, config: TrainConfig):
    """(AdamW with the memory value tables in their own group, its warmup + cosine LambdaLR scheduler)."""
    optimizer = torch.optim.AdamW(memory_parameter_groups(model, config.lr, config.values_lr, config.weight_decay),
                                  betas=(0.9, 0.95))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(config, step))


def resolve_device(name: str) -> torch.device:
    """"auto": this process's GPU (torchrun's LOCAL_RANK) when CUDA is available, else the CPU."""
    if name != "auto":
        return torch.device(name)
    return torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")


def lr_factor(config: TrainConfig, step: int) -> float:
    """Linear warmup over `warmup_steps`, then a cosine from 1 down to `min_lr_ratio` at `steps`."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def validation_loss(model: IPLForCausalLM, batches: List[torch.Tensor], device: torch.device) -> float:
    """Mean next-token loss (nats) over the validation windows; every window has the same number of targets."""
    was_training = model.training
    model.eval()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        losses = [model(ids.to(device), labels=ids.to(device), use_cache=False).loss.float() * len(ids)
                  for ids in batches]
    model.train(was_training)
    return (torch.stack(losses).sum() / sum(len(ids) for ids in batches)).item()


def bits(loss: float) -> float:
    """nats -> bits: bits per byte on byte-level data, bits per token otherwise."""
    return loss / math.log(2)


class JsonlLog:
    """Appends JSON records to `path`; None (the ranks other than 0) writes nothing."""

    def __init__(self, path: Optional[str]):
        self.path = path

    def write(self, **record):
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _check_resumable(config: TrainConfig, state: dict, path: str):
    saved = vars(TrainConfig(**state["config"]))  # keys added since the checkpoint was written take their defaults
    for key in RESUME_FIXED:
        if saved[key] != getattr(config, key):
            raise ValueError(f"--resume: {key} = {getattr(config, key)!r} differs from the checkpoint's "
                             f"{saved[key]!r} ({path}); use the run's config or a new out_dir")
    if config.tokenizer is not None:
        check_tokenizer_unchanged(config.tokenizer, state.get("tokenizer_sha256"), path)


def train(config: TrainConfig, resume: bool = False, stop_at: Optional[int] = None) -> dict:
    """Trains to `config.steps` (or to `stop_at`, as a preempted job would stop) and evaluates.

    Under torch.distributed (torchrun, or a process group the caller made) the model is wrapped in DDP (or sharded
    with FSDP2 when `parallel` is "fsdp", models/fsdp.py) and each of the W ranks takes every W-th row of each
    micro-batch, so W processes see the batches one process sees, and their averaged gradients are its gradients;
    rank 0 alone logs and writes checkpoints.

    Returns {"step", "losses": this call's per-step train losses, "val_loss", "val_bits", "byte_level"}."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if config.batch_size % world:
        raise ValueError(f"batch_size: expected a multiple of the {world} processes, got {config.batch_size}")
    say = (lambda text: print(text, file=sys.stderr)) if rank == 0 else (lambda text: None)
    os.makedirs(config.out_dir, exist_ok=True)
    checkpoint = latest_checkpoint(config.out_dir)
    if checkpoint is not None and not resume:
        raise ValueError(f"out_dir: {config.out_dir!r} holds a checkpoint ({checkpoint}): pass --resume to "
                         "continue it, or choose another out_dir")
    if checkpoint is not None:  # before the data: a changed tokenizer is refused, not used
        _check_resumable(config, read_trainer_state(checkpoint), checkpoint)
    train_tokens, val_tokens, byte_level = load_data(config, config.out_dir)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = build_model(config, byte_level).to(device).train()
    # the weights go into the whole model, before any sharding
    state = load_checkpoint(checkpoint, model) if checkpoint is not None else None
    use_fsdp = world > 1 and config.parallel == "fsdp"
    wrapped = fsdp.shard(model) if use_fsdp else DistributedDataParallel(model) if world > 1 else model
    optimizer, scheduler = build_optimizer(model, config)
    step = 0
    if state is not None:
        if use_fsdp:
            fsdp.load_optimizer_state(model, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        step = state["step"]
        say(f"resumed {checkpoint} at step {step}")
    elif resume:
        say(f"no checkpoint in {config.out_dir}: starting from step 0")
    tokenizer_sha256 = tokenizer_digest(config.tokenizer) if config.tokenizer is not None else None
    log = JsonlLog(os.path.join(config.out_dir, "log.jsonl") if rank == 0 else None)
    val = eval_batches(val_tokens, config.eval_sequences, config.seq_len + 1, config.batch_size)
    end = config.steps if stop_at is None else min(stop_at, config.steps)
    if step >= config.steps:
        say(f"{config.out_dir} is already trained ({step} of {config.steps} steps): evaluating")

    def save():
        saved, optimizer_state = model, optimizer.state_dict()
        if use_fsdp:  # every rank gathers; rank 0 writes the whole model, as one process would
            weights, optimizer_state = fsdp.full_model_state(model), fsdp.full_optimizer_state(model, optimizer)
            if rank == 0:
                saved = build_model(config, byte_level)
                saved.load_state_dict(weights)
        if rank == 0:
            save_checkpoint(config.out_dir, step, saved, {
                "step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(), "config": vars(config), "byte_level": byte_level,
                "tokenizer_sha256": tokenizer_sha256})
        if world > 1:
            dist.barrier()  # no rank runs ahead of a checkpoint it might have to resume from

    losses, tokens_per_step = [], config.batch_size * config.grad_accum * config.seq_len
    bar = tqdm(range(step, end), initial=step, total=config.steps, desc="train", unit="step", dynamic_ncols=True,
               disable=rank != 0)
    for _ in bar:
        started, loss_sum = time.perf_counter(), torch.zeros((), device=device)
        for micro in range(config.grad_accum):
            ids = train_batch(train_tokens, config.seed, step, micro, config.batch_size, config.seq_len + 1)
            ids = ids[rank::world].to(device)
            last = micro == config.grad_accum - 1  # gradients are averaged across ranks on the last backward only
            if use_fsdp:
                model.set_requires_gradient_sync(last)
            with wrapped.no_sync() if world > 1 and not use_fsdp and not last else contextlib.nullcontext():
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    loss = wrapped(ids, labels=ids, use_cache=False).loss / config.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        if world > 1:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)  # the loss of the global batch, as one process logs it
        loss_sum = loss_sum.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()  # FSDP
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        losses.append(loss_sum)
        tokens_per_s = tokens_per_step / (time.perf_counter() - started)
        bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tokens_per_s:,.0f}")
        if step % config.log_every == 0 or step == end:
            log.write(step=step, loss=loss_sum, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s)
        if step % config.eval_every == 0 and step < config.steps:
            val_loss = validation_loss(model, val, device)
            log.write(step=step, val_loss=val_loss, val_bits=bits(val_loss))
            if rank == 0:
                bar.write(f"step {step}: validation loss {val_loss:.4f}, {bits(val_loss):.4f} bits per "
                          f"{'byte' if byte_level else 'token'}")
        if step % config.save_every == 0 or step == end:
            save()
    bar.close()
    val_loss = validation_loss(model, val, device)
    log.write(step=step, val_loss=val_loss, val_bits=bits(val_loss))
    return {"step": step, "losses": losses, "val_loss": val_loss, "val_bits": bits(val_loss),
            "byte_level": byte_level}


def main(argv: Optional[List[str]] = None):
    args = list(sys.argv[1:] if argv is None else argv)
    resume = "--resume" in args
    config = parse_config([a for a in args if a != "--resume"])
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1  # launched by torchrun
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    result = train(config, resume=resume)
    if distributed:
        dist.destroy_process_group()
        if int(os.environ["RANK"]) != 0:
            return
    unit = "byte" if result["byte_level"] else "token"
    print(f"step {result['step']}/{config.steps}: validation loss {result['val_loss']:.4f} nats, "
          f"{result['val_bits']:.4f} bits per {unit} ({config.eval_sequences} windows of {config.seq_len} tokens)")


if __name__ == "__main__":
    main()
