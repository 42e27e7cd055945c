"""Name -> constructor registries of the sequence mixers and feed-forwards an `IPLConfig` can name.

A mixer builder is `builder(config, layer_idx, **kwargs) -> nn.Module`, the module following the layer interface
`forward(hidden_states, attention_mask=None, past_key_values=None, use_cache=False, **kwargs) -> (out, None,
cache)` and keeping its states in the `FastWeightCache` under `layer_idx`. A feed-forward builder is
`builder(config, **kwargs) -> nn.Module` with `forward(hidden_states) -> out`, token-wise. `kwargs` are the
config's per-name kwargs (`mixer_kwargs[name]`, `ffn["kwargs"][name]`). A later layer registers itself with
`register_mixer("name", builder)`, and a config can then name it.
"""

from typing import Callable, Dict

from torch import nn

from ipl_layers import layers
from ipl_layers.models.attention import IPLAttention
from ipl_layers.models.blocks import SwiGLU

MIXERS: Dict[str, Callable[..., nn.Module]] = {}
FFNS: Dict[str, Callable[..., nn.Module]] = {}


def _register(registry: Dict[str, Callable], kind: str, name: str, builder: Callable) -> Callable:
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"register_{kind}: name: expected an identifier (used in pattern strings), got {name!r}")
    if name in registry and registry[name] is not builder:
        raise ValueError(f"register_{kind}: {name!r} is already registered")
    registry[name] = builder
    return builder


def register_mixer(name: str, builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Makes `name` usable in `IPLConfig.mixers`; `builder(config, layer_idx, **kwargs)` builds the layer."""
    return _register(MIXERS, "mixer", name, builder)


def register_ffn(name: str, builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Makes `name` usable in `IPLConfig.ffn`; `builder(config, **kwargs)` builds the feed-forward."""
    return _register(FFNS, "ffn", name, builder)


def _layer(cls) -> Callable[..., nn.Module]:
    """A builder for an `ipl_layers.layers` class: the model's width and heads unless kwargs override them."""
    def build(config, layer_idx: int, **kwargs) -> nn.Module:
        return cls(**{"hidden_size": config.hidden_size, "num_heads": config.num_heads, **kwargs}, layer_idx=layer_idx)
    return build


def _attention(window: bool) -> Callable[..., nn.Module]:
    def build(config, layer_idx: int, **kwargs) -> nn.Module:
        defaults = dict(hidden_size=config.hidden_size, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
                        window_size=config.window_size if window else None, rope_theta=config.rope_theta)
        return IPLAttention(**{**defaults, **kwargs}, layer_idx=layer_idx)
    return build


register_mixer("attn", _attention(window=False))
register_mixer("swa", _attention(window=True))
register_mixer("linear_attn", _layer(layers.LinearAttention))
register_mixer("gla", _layer(layers.GatedLinearAttention))
register_mixer("deltanet", _layer(layers.DeltaNet))
register_mixer("gated_deltanet", _layer(layers.GatedDeltaNet))
register_mixer("ttt_linear", _layer(layers.TTTLinear))
register_mixer("ttt_mlp", _layer(layers.TTTMLP))
register_mixer("titans", _layer(layers.TitansMemory))
register_mixer("lact", _layer(layers.LaCT))
register_mixer("mamba2", _layer(layers.Mamba2))
# the window from the config (shared with "swa"); memory, num_sink_tokens, adapter_rank, ... from mixer_kwargs
register_mixer("memory_attention", lambda config, layer_idx, **kwargs: layers.MemoryAttention(
    **{"hidden_size": config.hidden_size, "num_heads": config.num_heads, "window_size": config.window_size,
       "num_kv_heads": config.num_kv_heads, "rope_theta": config.rope_theta, **kwargs},  # RoPE and GQA as "swa"
    layer_idx=layer_idx))

register_ffn("swiglu", lambda config, **kwargs: SwiGLU(config.hidden_size, config.intermediate_size, **kwargs))
register_ffn("product_key", lambda config, **kwargs: layers.ProductKeyMemory(config.hidden_size, **kwargs))
register_ffn("memory_plus", lambda config, **kwargs: layers.MemoryPlus(config.hidden_size, **kwargs))
