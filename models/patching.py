"""`patch_attention`: swaps the self-attention of chosen decoder layers of an existing `transformers` decoder
(Llama-family and Qwen-family: `model.model.layers[i].self_attn`) for any registered mixer, leaving the rest of the
model (embeddings, MLPs, norms, the other layers, `generate()`) untouched:

    model = AutoModelForCausalLM.from_pretrained(...)
    reused = patch_attention(model, layers=[1, 3], mixer="gated_deltanet")   # {1: ["q_proj", "o_proj"], ...}

The q/k/v/o projections of the old attention are copied into the mixer's projections of the same name and shape
(biases and q/k norms, as in Qwen, have no counterpart and are dropped). Patching with "attn" reproduces a Llama
attention layer exactly (same projections, rotate-half RoPE at `rope_theta`; RoPE scaling variants are not
reproduced).

How the patched layers fit in the host model:
- State: pass a `FastWeightCache` as the host's cache (`model.generate(..., cache=FastWeightCache())`, or
  `model(..., cache=cache, use_cache=True)`): it is a `transformers` `Cache`, so the host's remaining attention layers
  keep their keys and values in it and the patched layers their fast weights, one cache that beam search reorders
  and that snapshots, restores and saves whole. Given the host's own `DynamicCache` (the default of `generate()`),
  the patched layers keep their states in a `FastWeightCache` attached to it (`cache.ipl_state`), living and dying
  with it, and append one placeholder key/value column per token to their layer of the host cache so that its
  `get_seq_length()` (RoPE positions and masks of the other layers) stays right; beam search is then not supported
  (the host's reorder does not reach the attached states).
- Padding: the host turns the [B, T] padding mask into 4-D causal masks before its layers; a forward pre-hook on
  the host's base model keeps the 2-D mask for the patched layers, which pack the real tokens as everywhere else.
- Saving: the patched model's state dict holds the mixers' weights; to reload, build the original model, patch it
  the same way, then `load_state_dict`.
"""

from types import SimpleNamespace
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from ipl_layers.cache import FastWeightCache
from ipl_layers.models.registry import MIXERS

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


class _MaskHolder:
    """The host model's 2-D padding mask of the current forward, shared by its patched layers."""

    def __init__(self):
        self.mask: Optional[torch.Tensor] = None

    def __call__(self, module, args, kwargs):  # forward pre-hook of the host's base model
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self.mask = mask if mask is None or mask.dim() == 2 else _NOT_2D


_NOT_2D = object()  # the host got a mask the patched layers cannot read


class PatchedAttention(nn.Module):
    """Stands in for a host attention module: `forward(hidden_states, ..., cache=None, **kwargs) -> (out, None)`."""

    def __init__(self, mixer: nn.Module, layer_idx: int, holder: _MaskHolder):
        super().__init__()
        self.mixer, self.layer_idx, self._holder = mixer, layer_idx, holder

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, cache=None, **kwargs):
        mask = self._holder.mask
        if mask is _NOT_2D:
            raise ValueError("patched attention: the host model got a non-2-D attention_mask; patched layers need the "
                             "[B, T] padding mask (1 keep, 0 pad)")
        state = cache
        if cache is not None and not isinstance(cache, FastWeightCache):
            if not hasattr(cache, "ipl_state"):
                cache.ipl_state = FastWeightCache()
            state = cache.ipl_state
        out, _, _ = self.mixer(hidden_states, attention_mask=mask, past_key_values=state, use_cache=state is not None)
        if state is not cache:  # one placeholder column per token: the host cache's length counts this layer too
            B, T, _ = hidden_states.shape
            placeholder = hidden_states.new_zeros(B, 1, T, 1)  # [B, 1 head, T, 1]
            cache.update(placeholder, placeholder, self.layer_idx)
        return out, None


def _mixer_config(config, mixer_kwargs: dict) -> SimpleNamespace:
    """What the registry builders read from an `IPLConfig`, taken from a host config."""
    rope = getattr(config, "rope_parameters", None) or {}
    return SimpleNamespace(
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        window_size=mixer_kwargs.pop("window_size", None) or getattr(config, "sliding_window", None),
        rope_theta=rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)),
    )


def patch_attention(model: nn.Module, layers: Iterable[int], mixer: str, **mixer_kwargs) -> Dict[int, List[str]]:
    """Replaces `model.model.layers[i].self_attn` for every i in `layers` by the mixer `mixer` (a name registered in
    `ipl_layers.models.registry`, built with the host's width and heads plus `mixer_kwargs`). Returns, per patched
    layer, the names of the projections copied from the old attention."""
    base = getattr(model, "model", model)
    decoder_layers = getattr(base, "layers", None)
    if decoder_layers is None or not all(hasattr(layer, "self_attn") for layer in decoder_layers):
        raise ValueError(f"patch_attention: expected a decoder with model.layers[i].self_attn (Llama/Qwen family), "
                         f"got {type(model).__name__}")
    if mixer not in MIXERS:
        raise ValueError(f"patch_attention: mixer: expected one of {sorted(MIXERS)}, got {mixer!r}")
    indices = sorted(set(layers))
    for i in indices:
        if not isinstance(i, int) or not 0 <= i < len(decoder_layers):
            raise ValueError(f"patch_attention: layers: expected indices in [0, {len(decoder_layers)}), got {i!r}")
    config = _mixer_config(model.config, dict(mixer_kwargs))
    mixer_kwargs = {k: v for k, v in mixer_kwargs.items() if k != "window_size"}
    if mixer == "swa" and config.window_size is None:
        raise ValueError("patch_attention: 'swa' needs window_size=... (the host config has no sliding_window)")
    if mixer in ("attn", "swa", "memory_attention") and getattr(model.config, "head_dim", None):
        mixer_kwargs.setdefault("head_dim", model.config.head_dim)

    holder = getattr(base, "_ipl_mask_holder", None)
    if holder is None:
        holder = base._ipl_mask_holder = _MaskHolder()
        base.register_forward_pre_hook(holder, with_kwargs=True)
    reused = {}
    for i in indices:
        old = decoder_layers[i].self_attn
        if isinstance(old, PatchedAttention):
            raise ValueError(f"patch_attention: layer {i} is already patched")
        weight = old.q_proj.weight
        new = MIXERS[mixer](config, i, **mixer_kwargs).to(device=weight.device, dtype=weight.dtype)
        reused[i] = []
        with torch.no_grad():
            for name in PROJECTIONS:
                src, dst = getattr(old, name, None), getattr(new, name, None)
                if src is not None and dst is not None and src.weight.shape == dst.weight.shape:
                    dst.weight.copy_(src.weight)
                    reused[i].append(name)
        decoder_layers[i].self_attn = PatchedAttention(new, i, holder)
    return reused
