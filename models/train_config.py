"""The training configuration: a YAML or JSON file (or a shipped name: "demo", "125m", "350m" in `configs/`) with
`--key=value` overrides; `--model.<field>=value` sets a field of the model's `IPLConfig`.

Every key is checked: an unknown key, a value of the wrong type or out of range raises a ValueError naming the key,
the expected and the actual value, before any data is read or model built.
"""

import dataclasses
import json
import os
import typing
from typing import List, Optional

import yaml

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


@dataclasses.dataclass
class TrainConfig:
    model: dict = dataclasses.field(default_factory=dict)  # IPLConfig keyword arguments
    data: Optional[str] = None  # None: the embedded stdlib byte corpus; else a path (see data.py)
    tokenizer: Optional[str] = None  # a local transformers tokenizer folder for text data (tokenizer.py); None: bytes
    token_dtype: str = "uint16"  # of a raw .bin token file
    val_fraction: float = 0.05
    seed: int = 0
    seq_len: int = 256
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    steps: int = 1000
    lr: float = 3e-3
    values_lr: float = 1e-2  # the memory layers' value tables (memory_parameter_groups)
    weight_decay: float = 0.1
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    eval_every: int = 200
    eval_sequences: int = 32  # validation windows of seq_len per eval
    save_every: int = 200
    log_every: int = 10
    out_dir: str = "runs/default"
    device: str = "auto"  # "auto": cuda when available, else cpu
    parallel: str = "ddp"  # under torchrun: "ddp" (replicated model) or "fsdp" (FSDP2 fully_shard per block)
    eval_seq_len: int = 1024  # the per-position loss eval (evaluate.py)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), f.type))
        positive = ("seq_len", "batch_size", "grad_accum", "steps", "eval_every", "eval_sequences", "save_every",
                    "log_every", "eval_seq_len")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)}")
        for name in ("lr", "values_lr", "weight_decay", "grad_clip", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction: expected a value in (0, 1), got {self.val_fraction}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: expected a value in [0, 1], got {self.min_lr_ratio}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel: expected 'ddp' or 'fsdp', got {self.parallel!r}")
        if self.tokenizer is not None and self.data is not None and self.data.endswith((".npy", ".bin")):
            raise ValueError(f"tokenizer: expected text data to tokenize, got data = {self.data!r}, a token file "
                             "(already tokenized): drop --tokenizer or pass the text")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:<i>', got {self.device!r}")


def _coerce(name: str, value, kind):
    """`value` as the field's type; strings from the command line are converted, anything else must match."""
    optional = typing.get_origin(kind) is typing.Union  # Optional[str]: None or a str
    base = typing.get_args(kind)[0] if optional else kind
    if value is None and optional:
        return None
    if isinstance(value, str) and base in (int, float):
        try:
            return base(value)
        except ValueError:
            pass
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, base) or isinstance(value, bool):
        raise ValueError(f"{name}: expected {base.__name__}, got {value!r}")
    return value


def _parse_value(text: str):
    """A command-line value as YAML reads it (ints, floats, lists, null), "1e-3" as a float (YAML 1.1 does not)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def read_config_file(name_or_path: str) -> dict:
    """A shipped config by name ("demo") or a .yaml/.yml/.json file."""
    path = name_or_path
    if not os.path.exists(path) and os.path.exists(os.path.join(CONFIG_DIR, f"{name_or_path}.yaml")):
        path = os.path.join(CONFIG_DIR, f"{name_or_path}.yaml")
    if not os.path.exists(path):
        shipped = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))
        raise ValueError(f"config: expected a file or one of {shipped}, got {name_or_path!r}")
    with open(path) as f:
        raw = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    if not isinstance(raw, dict):
        raise ValueError(f"config: {path!r}: expected a mapping of keys to values, got {type(raw).__name__}")
    return raw


def parse_config(args: List[str]) -> TrainConfig:
    """`--config=<name|file>` (default "demo") then `--key=value` overrides, in order."""
    raw, overrides = read_config_file("demo"), []
    for arg in args:
        key, eq, text = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if not key or not eq:
            raise ValueError(f"arguments: expected --key=value, got {arg!r}")
        if key == "config":
            raw = read_config_file(text)
        else:
            overrides.append((key, _parse_value(text)))
    raw = {**raw, "model": dict(raw.get("model") or {})}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in overrides:
        section, dot, field = key.partition(".")
        if dot and section == "model":
            raw["model"][field] = value
        elif dot or key not in fields:
            raise ValueError(f"--{key}: expected one of {sorted(fields - {'model'})} or model.<IPLConfig field>")
        else:
            raw[key] = value
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(f"config: expected keys among {sorted(fields)}, got unknown {unknown}")
    return TrainConfig(**raw)
