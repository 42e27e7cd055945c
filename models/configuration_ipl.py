"""`IPLConfig`: the configuration of a hybrid IPL decoder, one sequence mixer and one feed-forward per layer.

    IPLConfig(
        vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_heads=8,
        mixers="(swa,ttt_linear)*2,swa,gated_deltanet*3",     # or a list: ["swa", "ttt_linear", ...]
        mixer_kwargs={"ttt_linear": {"mini_batch_size": 16}},  # per mixer name, passed to its constructor
        ffn={"default": "swiglu", "memory": "memory_plus", "memory_layers": [3],
             "kwargs": {"memory_plus": {"num_keys": 128, "topk": 16}}},
        window_size=512,                                      # of the "swa" layers
    )

Pattern strings: comma-separated items, each a mixer name, `name*n` (n copies) or a group `(a,b,...)*n` (groups
nest); spaces are ignored. The config stores the expanded list, so a saved config.json names every layer.

Mixer names are those registered in `ipl_layers.models.registry` ("attn", "swa", "linear_attn", "gla",
"deltanet", "gated_deltanet", "ttt_linear", "ttt_mlp", "titans", "lact", "mamba2", and any registered later);
every one gets `hidden_size`, `num_heads` and its `layer_idx`, plus `mixer_kwargs[name]`. Feed-forwards: "swiglu"
(width `intermediate_size`), "product_key" and "memory_plus" (`ipl_layers.layers.memory`); `ffn` may also be a
plain name, used by every layer. Mistakes raise a ValueError naming the field, what was expected and what came.
"""

import re
from typing import Dict, List

from transformers import PretrainedConfig

from ipl_layers.models.registry import FFNS, MIXERS

_GROUP = re.compile(r"\(([^()]*)\)\*(\d+)")
_FFN_KEYS = ("default", "memory", "memory_layers", "kwargs")


def expand_pattern(pattern: str) -> List[str]:
    """"(swa,ttt_linear)*2,attn" -> ["swa", "ttt_linear", "swa", "ttt_linear", "attn"]; see the module docstring."""
    text = pattern.replace(" ", "")
    while True:  # innermost groups first, until none is left
        expanded = _GROUP.sub(lambda m: ",".join([m.group(1)] * int(m.group(2))), text)
        if expanded == text:
            break
        text = expanded
    if "(" in text or ")" in text:
        raise ValueError(f"mixers: pattern {pattern!r}: expected groups written '(a,b)*n', got unbalanced or "
                         "unrepeated parentheses")
    names = []
    for item in text.split(","):
        name, star, count = item.partition("*")
        if not name or (star and not (count.isdigit() and int(count) > 0)):
            raise ValueError(f"mixers: pattern {pattern!r}: expected items 'name' or 'name*n' (n >= 1), got {item!r}")
        names += [name] * (int(count) if star else 1)
    return names


def _check_kwargs(field: str, kwargs, registry: Dict) -> dict:
    """{name: {kwarg: value}} with every name registered."""
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, dict) or not all(isinstance(v, dict) for v in kwargs.values()):
        raise ValueError(f"{field}: expected a dict {{name: {{kwarg: value}}}}, got {kwargs!r}")
    for name in kwargs:
        if name not in registry:
            raise ValueError(f"{field}: expected names among {sorted(registry)}, got {name!r}")
    return dict(kwargs)


class IPLConfig(PretrainedConfig):
    """See the module docstring. `num_kv_heads` (default `num_heads`) is for the attention mixers (GQA);
    `intermediate_size` defaults to 8/3 hidden_size rounded up to a multiple of 64."""

    model_type = "ipl"

    vocab_size: int = 32000
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    mixers: list | str | None = None
    mixer_kwargs: dict | None = None
    ffn: dict | str | None = None
    window_size: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None

    def __post_init__(self, **kwargs):
        self._check_sizes()
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.intermediate_size is None:
            self.intermediate_size = -(-8 * self.hidden_size // 3 // 64) * 64
        self.mixers = self._expand_mixers()
        self.mixer_kwargs = _check_kwargs("mixer_kwargs", self.mixer_kwargs, MIXERS)
        self.ffn = self._normalize_ffn()
        super().__post_init__(**kwargs)

    def _check_sizes(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "window_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads: expected a divisor of hidden_size = {self.hidden_size}, got {self.num_heads}")
        if self.num_kv_heads is not None and (not isinstance(self.num_kv_heads, int) or self.num_kv_heads < 1
                                              or self.num_heads % self.num_kv_heads):
            raise ValueError(f"num_kv_heads: expected a divisor of num_heads = {self.num_heads}, "
                             f"got {self.num_kv_heads!r}")

    def _expand_mixers(self) -> List[str]:
        if self.mixers is None:
            return ["attn"] * self.num_hidden_layers
        if isinstance(self.mixers, str):
            mixers = expand_pattern(self.mixers)
        elif isinstance(self.mixers, (list, tuple)) and all(isinstance(m, str) for m in self.mixers):
            mixers = list(self.mixers)
        else:
            raise ValueError(f"mixers: expected a list of names or a pattern string, got {self.mixers!r}")
        if len(mixers) != self.num_hidden_layers:
            raise ValueError(f"mixers: expected num_hidden_layers = {self.num_hidden_layers} names, got "
                             f"{len(mixers)}: {mixers}")
        for i, name in enumerate(mixers):
            if name not in MIXERS:
                raise ValueError(f"mixers[{i}]: expected one of {sorted(MIXERS)}, got {name!r}")
        return mixers

    def _normalize_ffn(self) -> dict:
        ffn = {"default": self.ffn} if isinstance(self.ffn, str) else {} if self.ffn is None else self.ffn
        if not isinstance(ffn, dict):
            raise ValueError(f"ffn: expected a name or a dict with keys {_FFN_KEYS}, got {self.ffn!r}")
        unknown = sorted(set(ffn) - set(_FFN_KEYS))
        if unknown:
            raise ValueError(f"ffn: expected keys among {_FFN_KEYS}, got unknown {unknown}")
        ffn = {"default": "swiglu", "memory": "memory_plus", "memory_layers": [], "kwargs": {}, **ffn}
        for key in ("default", "memory"):
            if ffn[key] not in FFNS:
                raise ValueError(f"ffn[{key!r}]: expected one of {sorted(FFNS)}, got {ffn[key]!r}")
        layers = ffn["memory_layers"]
        if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) for i in layers):
            raise ValueError(f"ffn['memory_layers']: expected a list of layer indices, got {layers!r}")
        for i in layers:
            if not 0 <= i < self.num_hidden_layers:
                raise ValueError(f"ffn['memory_layers']: expected indices in [0, {self.num_hidden_layers}) "
                                 f"(num_hidden_layers = {self.num_hidden_layers}), got {i}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"ffn['memory_layers']: expected distinct indices, got {list(layers)}")
        ffn["memory_layers"] = sorted(layers)
        ffn["kwargs"] = _check_kwargs("ffn['kwargs']", ffn["kwargs"], FFNS)
        return ffn

    def ffn_name(self, layer_idx: int) -> str:
        """The feed-forward of layer `layer_idx`: the memory layer at the memory indices, else the default."""
        return self.ffn["memory"] if layer_idx in self.ffn["memory_layers"] else self.ffn["default"]
