"""`ipl-retrofit` / `python -m ipl_layers.models.retrofit`: turns chosen full-attention layers of a pretrained
`transformers` causal LM (Llama / Qwen family, from a local folder) into `MemoryAttention` layers — sliding-window
attention plus a fast-weight memory of the tokens that left the window — initialised from the original q/k/v/o
projections, and trains only the new memory parameters by self-distillation: the KL divergence of the retrofitted
model's next-token distribution from the frozen original's, on the same text.

    ipl-retrofit path/to/model --layers=4,8,12 --window_size=512 --memory=gated_deltanet --out_dir=runs/retro
    ipl-retrofit path/to/model ... --resume         # continue runs/retro from its latest checkpoint
    model = load_retrofitted("runs/retro")          # the base model, retrofitted, with the trained memory

The loop is ipl-train's: AdamW, linear warmup then cosine, clipping, a tqdm bar, `log.jsonl`, atomic checkpoints
with a manifest (only the trained parameters are stored: the rest is the base model), exact resume (batches are a
function of (seed, step)). Data: `--data` text as for ipl-train (default: the embedded stdlib corpus), encoded by
the base model's own tokenizer when its folder holds one (`--tokenizer` names another folder), else as bytes (the
base vocabulary must then cover the 256 byte values). At the end, and every `eval_every` steps, the KL to
the teacher is reported inside the window and beyond it, next to the same model with its memory gates closed (the
sliding-window-only model that the memory has to beat).
"""

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from ipl_layers.layers import MemoryAttention
from ipl_layers.models.checkpoint import latest_checkpoint, load_checkpoint, read_trainer_state, save_checkpoint
from ipl_layers.models.data import BYTE_VOCAB, eval_batches, load_splits, train_batch
from ipl_layers.models.patching import patch_attention
from ipl_layers.models.tokenizer import tokenized_splits
from ipl_layers.models.train import JsonlLog, lr_factor, resolve_device

# options a resumed run must share with its checkpoint: they define the model and the batches seen so far
RESUME_FIXED = ("base", "layers", "window_size", "memory", "adapter_rank", "memory_kwargs", "data", "tokenizer",
                "val_fraction", "seed", "seq_len", "batch_size")


@dataclass
class RetrofitConfig:
    base: str  # a local folder with a transformers causal LM (config.json + weights)
    layers: List[int]  # decoder layer indices whose attention becomes MemoryAttention
    window_size: int = 512
    memory: str = "gated_deltanet"
    adapter_rank: int = 8  # the memory's own low-rank q/k/v adapters (0: it reads and writes the attention's)
    memory_kwargs: Dict = field(default_factory=dict)  # more MemoryAttention options
    data: Optional[str] = None
    tokenizer: Optional[str] = None  # None: the base folder's tokenizer when it has one, else bytes
    val_fraction: float = 0.05
    seed: int = 0
    seq_len: int = 2048
    batch_size: int = 4
    steps: int = 1000
    lr: float = 1e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_sequences: int = 16
    save_every: int = 200
    log_every: int = 10
    out_dir: str = "runs/retrofit"
    device: str = "auto"

    def __post_init__(self):
        if not self.layers or not all(isinstance(i, int) and i >= 0 for i in self.layers):
            raise ValueError(f"layers: expected a non-empty list of layer indices, got {self.layers!r}")
        if not isinstance(self.window_size, int) or self.window_size < 1:
            raise ValueError(f"window_size: expected a positive int, got {self.window_size!r}")
        if self.seq_len <= self.window_size:
            raise ValueError(f"seq_len: expected more than window_size = {self.window_size} (else the memory is "
                             f"never written), got {self.seq_len}")
        for name in ("batch_size", "steps", "eval_every", "eval_sequences", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)}")


def retrofit(model: torch.nn.Module, layers: List[int], window_size: int, memory: str = "gated_deltanet",
             **memory_kwargs) -> List[str]:
    """Replaces the attention of `model.model.layers[i]` for i in `layers` by `MemoryAttention` (q/k/v/o copied
    from the old attention), freezes every other parameter and the copied projections; returns the names of the
    parameters left to train (gates, write strengths, decays, ...)."""
    reused = patch_attention(model, layers, "memory_attention", window_size=window_size, memory=memory,
                             **memory_kwargs)
    decoder_layers = getattr(model, "model", model).layers
    new = set()
    for i, copied in reused.items():
        for name, p in decoder_layers[i].self_attn.mixer.named_parameters():
            if name.split(".")[0] not in copied:
                new.add(p)
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(p in new)
        if p in new:
            trainable.append(name)
    return trainable


@contextlib.contextmanager
def memory_closed(model: torch.nn.Module):
    """Within the block every MemoryAttention gate is shut (sigmoid(-inf) = 0): the sliding-window model alone."""
    gates = [m.gate for m in model.modules() if isinstance(m, MemoryAttention)]
    saved = [g.detach().clone() for g in gates]
    with torch.no_grad():
        for g in gates:
            g.fill_(float("-inf"))
    try:
        yield model
    finally:
        with torch.no_grad():
            for g, s in zip(gates, saved):
                g.copy_(s)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions at every position: [B, T] in nats."""
    log_q = F.log_softmax(student_logits.float(), -1)
    log_p = F.log_softmax(teacher_logits.float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@torch.no_grad()
def kl_by_position(student, teacher, batches: List[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Mean KL to the teacher at each position over the validation windows: [T]."""
    total = None
    for ids in batches:
        ids = ids.to(device)
        kl = distillation_kl(student(ids, use_cache=False).logits, teacher(ids, use_cache=False).logits).sum(0)
        total = kl if total is None else total + kl
    return total / sum(len(ids) for ids in batches)


def kl_report(student, teacher, batches: List[torch.Tensor], window: int, device: torch.device) -> Dict[str, float]:
    """KL inside the window (positions < window_size, where nothing has been written yet) and beyond it, for the
    retrofitted model and for the same model with its memory closed."""
    was_training = student.training
    student.eval()
    report = {}
    for label, context in (("retrofit", contextlib.nullcontext()), ("window_only", memory_closed(student))):
        with context:
            kl = kl_by_position(student, teacher, batches, device)
        report[f"{label}_kl_inside"] = kl[:window].mean().item()
        report[f"{label}_kl_beyond"] = kl[window:].mean().item()
    student.train(was_training)
    return report


def tokenizer_path(config: RetrofitConfig) -> Optional[str]:
    """The tokenizer folder the text goes through: `tokenizer`, else the base folder when it holds one, else None
    (bytes)."""
    if config.tokenizer is not None:
        return config.tokenizer
    has_one = any(os.path.isfile(os.path.join(config.base, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
    return config.base if has_one else None


def load_data(config: RetrofitConfig):
    """(train, validation) token arrays of `data`, through the tokenizer or as bytes."""
    path = tokenizer_path(config)
    if path is not None:
        if config.data is not None and config.data.endswith((".npy", ".bin")):
            raise ValueError(f"data: expected text for the tokenizer {path!r}, got the token file {config.data!r}")
        return tokenized_splits(config.data, config.val_fraction, path, cache_dir=config.out_dir)
    train_tokens, val_tokens, byte_level = load_splits(config.data, config.val_fraction)
    if not byte_level:
        raise ValueError(f"data: expected text, got the token file {config.data!r}: the token ids of another "
                         "tokenizer mean nothing to the base model")
    return train_tokens, val_tokens


def load_models(config: RetrofitConfig, device: torch.device):
    """(teacher, student, trainable names): the base model twice, the second retrofitted."""
    teacher = AutoModelForCausalLM.from_pretrained(config.base, local_files_only=True).to(device).eval()
    teacher.requires_grad_(False)
    if tokenizer_path(config) is None and teacher.config.vocab_size < BYTE_VOCAB:
        raise ValueError(f"base: byte-level data (no tokenizer in {config.base!r}) needs a vocabulary of >= "
                         f"{BYTE_VOCAB}, got {teacher.config.vocab_size}")
    torch.manual_seed(config.seed)  # the memory's own initial parameters
    student = AutoModelForCausalLM.from_pretrained(config.base, local_files_only=True)
    trainable = retrofit(student, config.layers, config.window_size, config.memory, adapter_rank=config.adapter_rank,
                         **config.memory_kwargs)
    return teacher, student.to(device), trainable


def load_retrofitted(run_dir: str, device: str = "cpu") -> torch.nn.Module:
    """The retrofitted model of a run (its latest checkpoint): the base model, retrofitted, trained parameters in."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"run_dir: {run_dir!r} holds no checkpoint")
    config = RetrofitConfig(**read_trainer_state(checkpoint)["config"])
    _, student, _ = load_models(config, torch.device(device))
    load_checkpoint(checkpoint, student, partial=True)
    return student.eval()


def train(config: RetrofitConfig, resume: bool = False, stop_at: Optional[int] = None) -> dict:
    """Distils to `config.steps` (or `stop_at`); returns {"step", "losses", **the final KL report}."""
    os.makedirs(config.out_dir, exist_ok=True)
    checkpoint = latest_checkpoint(config.out_dir)
    if checkpoint is not None and not resume:
        raise ValueError(f"out_dir: {config.out_dir!r} holds a checkpoint ({checkpoint}): pass --resume to "
                         "continue it, or choose another out_dir")
    train_tokens, val_tokens = load_data(config)
    device = resolve_device(config.device)
    teacher, student, trainable = load_models(config, device)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(config, step))
    step = 0
    if checkpoint is not None:
        saved = read_trainer_state(checkpoint)["config"]
        for key in RESUME_FIXED:
            if saved[key] != getattr(config, key):
                raise ValueError(f"--resume: {key} = {getattr(config, key)!r} differs from the checkpoint's "
                                 f"{saved[key]!r} ({checkpoint}); use the run's options or a new out_dir")
        state = load_checkpoint(checkpoint, student, partial=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        step = state["step"]
        print(f"resumed {checkpoint} at step {step}", file=sys.stderr)
    log = JsonlLog(os.path.join(config.out_dir, "log.jsonl"))
    val = eval_batches(val_tokens, config.eval_sequences, config.seq_len, config.batch_size)
    end = config.steps if stop_at is None else min(stop_at, config.steps)

    def save():
        save_checkpoint(config.out_dir, step, student, {
            "step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(), "config": asdict(config)}, only=trainable)

    student.train()
    losses = []
    bar = tqdm(range(step, end), initial=step, total=config.steps, desc="retrofit", unit="step", dynamic_ncols=True)
    for _ in bar:
        started = time.perf_counter()
        ids = train_batch(train_tokens, config.seed, step, 0, config.batch_size, config.seq_len).to(device)
        with torch.no_grad():
            teacher_logits = teacher(ids, use_cache=False).logits
        loss = distillation_kl(student(ids, use_cache=False).logits, teacher_logits).mean()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip or float("inf")).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        step += 1
        losses.append(loss.item())
        tokens_per_s = ids.numel() / (time.perf_counter() - started)
        bar.set_postfix(kl=f"{losses[-1]:.4f}", tok_s=f"{tokens_per_s:,.0f}")
        if step % config.log_every == 0 or step == end:
            log.write(step=step, kl=losses[-1], lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s)
        if step % config.eval_every == 0 and step < config.steps:
            log.write(step=step, **kl_report(student, teacher, val, config.window_size, device))
        if step % config.save_every == 0 or step == end:
            save()
    bar.close()
    report = kl_report(student, teacher, val, config.window_size, device)
    log.write(step=step, **report)
    with open(os.path.join(config.out_dir, "retrofit.json"), "w") as f:
        json.dump({"step": step, **report}, f, indent=1)
    return {"step": step, "losses": losses, **report}


def parse_args(argv: List[str]):
    parser = argparse.ArgumentParser(prog="ipl-retrofit", description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="local folder of a transformers causal LM")
    parser.add_argument("--layers", required=True, help="comma-separated decoder layer indices, e.g. 4,8,12")
    parser.add_argument("--memory_kwargs", default="{}", help="JSON object of more MemoryAttention options")
    parser.add_argument("--resume", action="store_true", help="continue out_dir from its latest checkpoint")
    defaults = RetrofitConfig(base="", layers=[0])
    for name, value in asdict(defaults).items():
        if name not in ("base", "layers", "memory_kwargs"):
            kind = type(value) if value is not None else str
            parser.add_argument(f"--{name}", type=kind, default=value)
    args = vars(parser.parse_args(argv))
    resume = args.pop("resume")
    try:
        args["layers"] = [int(i) for i in args["layers"].split(",")]
    except ValueError as e:
        raise ValueError(f"--layers: expected comma-separated ints, got {args['layers']!r}") from e
    args["memory_kwargs"] = json.loads(args["memory_kwargs"])
    return RetrofitConfig(**args), resume


def main(argv: Optional[List[str]] = None):
    config, resume = parse_args(list(sys.argv[1:] if argv is None else argv))
    result = train(config, resume=resume)
    print(f"step {result['step']}/{config.steps}: KL to the teacher beyond the window {result['retrofit_kl_beyond']:.4f} "
          f"nats (window only: {result['window_only_kl_beyond']:.4f}); inside {result['retrofit_kl_inside']:.4f}")


if __name__ == "__main__":
    main()
