"""`FastWeightCache`: the states a model carries from one call to the next, one dict per layer, as a
`transformers` `Cache`.

In-parameter-learning layers learn while they read: their fast weights (a linear-attention state
[N, H, K, V], short-conv histories [N, D, W-1], a `TTTLinearState`, ...) are the memory of everything seen so
far. The cache holds them per layer index so that they can be carried across calls (prefill, then decode), and
audited:

    cache = FastWeightCache()
    o, _, cache = layer(x, use_cache=True, past_key_values=cache)   # the layer stores its states
    before = cache.snapshot()                                       # deep, detached copy
    o, _, cache = layer(y, use_cache=True, past_key_values=cache)   # learns from y
    cache.update_norms(before)                                      # {layer: {state: ||now - before||}}
    cache.restore(before)                                           # roll the learning back
    cache.save("memory.safetensors"); FastWeightCache().load("memory.safetensors")
    cache.reset()                                                   # forget everything

Layer `i` (`cache.layers[i]`, a `FastWeightLayer`) holds a dict of named states, `cache[i]`, each a tensor or a
tuple of tensors with the batch (or sequence) first, plus "seen_tokens", the number of token positions it has
processed (padding included, as `transformers` counts the columns of the attention mask). Our layers store
theirs with `update_states(layer_idx, offset=T, name=state, ...)`: the linear-attention layers "recurrent_state"
(fp32 [N, H, K, V]) and, with short convolutions, "conv_state" (the (q, k, v) states); our attention "kv_state".

Being a `Cache`, it also takes `transformers` attention layers: `update(key_states, value_states, layer_idx)`
appends keys and values [B, H, T, D] to the layer's "keys"/"values" states as a `DynamicLayer` does, so a
patched Llama or Qwen (`ipl_layers.models.patch_attention`) keeps its remaining attention layers and our mixers in
one cache that `generate()`, beam search and the audit operations see whole. Fast weights cannot be cropped
(`is_croppable` is False: assisted decoding cannot roll them back; `snapshot`/`restore` can) and the cache is not
compileable (so `generate()` hands the layers the 2-D padding mask they read).
"""

import json
from typing import Dict, Optional, Tuple, Union

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

State = Union[torch.Tensor, Tuple[torch.Tensor, ...]]

_FORMAT = "ipl_layers.FastWeightCache/1"


def _map(value: State, fn) -> State:
    """Applies `fn` to a state tensor, or to every tensor of a tuple state (keeping a state class's type: each
    is built from its tensors in order)."""
    if not isinstance(value, tuple):
        return fn(value)
    mapped = [fn(t) for t in value]
    return tuple(mapped) if type(value) is tuple else type(value)(*mapped)


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone()


class FastWeightLayer(CacheLayerMixin):
    """One layer's states: `states`, a dict of named tensors or tuples of tensors (batch first) and "seen_tokens"."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False  # states are whatever the layer stores; nothing to allocate ahead

    def __init__(self, states: Optional[Dict[str, object]] = None):
        self.states: Dict[str, object] = {} if states is None else states

    def __repr__(self) -> str:
        return f"FastWeightLayer({sorted(k for k in self.states if k != 'seen_tokens')})"

    @property
    def is_initialized(self) -> bool:
        return bool(self.states)

    @property
    def keys(self) -> Optional[torch.Tensor]:
        """A `transformers` attention layer's keys [B, H, L, D] (None for our layers)."""
        return self.states.get("keys")

    @property
    def values(self) -> Optional[torch.Tensor]:
        return self.states.get("values")

    def store(self, offset: int, states: Dict[str, Optional[State]]):
        """Replaces the given states (None values are skipped) and advances "seen_tokens" by `offset`."""
        for name, value in states.items():
            if value is None:
                continue
            if isinstance(value, list):
                value = tuple(value)
            tensors = value if isinstance(value, tuple) else (value,)
            if not all(isinstance(t, torch.Tensor) for t in tensors):
                raise TypeError(f"update_states: state {name!r} must be a tensor or a tuple of tensors")
            self.states[name] = value
        self.states["seen_tokens"] = self.get_seq_length() + int(offset)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # `update` starts from the first keys themselves

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Appends a `transformers` attention layer's keys and values [B, H, T, D]; returns all of them."""
        new = key_states.shape[-2]
        if self.keys is not None:
            key_states, value_states = torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)
        self.store(new, {"keys": key_states, "values": value_states})
        return key_states, value_states

    def get_seq_length(self) -> int:
        return int(self.states.get("seen_tokens", 0))

    def get_mask_sizes(self, query_length: int) -> Tuple[int, int]:
        return self.get_seq_length() + query_length, 0  # every past position stays visible (kv offset 0)

    def get_max_length(self) -> int:
        return -1

    def _map_states(self, fn):
        self.states = {name: value if name == "seen_tokens" else _map(value, fn)
                       for name, value in self.states.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_states(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_states(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_states(lambda t: t[indices.to(t.device)])

    def reset(self) -> None:
        self.states = {}

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("FastWeightCache: fast weights cannot be cropped (they hold what the removed "
                                      "tokens taught); take a snapshot() before and restore() it instead")

    def offload(self):
        raise NotImplementedError("FastWeightCache: offloading is not supported")

    prefetch = offload


class FastWeightCache(Cache):
    """Per-layer fast-weight states, carried across calls; see the module docstring."""

    def __init__(self):
        super().__init__(layer_class_to_replicate=FastWeightLayer)

    def __getitem__(self, layer_idx: int) -> Dict[str, object]:
        """The dict of layer `layer_idx`'s states (empty for a layer below len(self) that never stored any)."""
        return self.layers[layer_idx].states

    def __repr__(self) -> str:
        return f"FastWeightCache({dict(enumerate(self.layers))})"

    def update_states(self, layer_idx: int, *, offset: int, **states: Optional[State]) -> Dict[str, object]:
        """Stores the given states of layer `layer_idx` (replacing earlier ones; None values are skipped)
        and advances its "seen_tokens" by `offset`, the number of token positions just processed."""
        if not isinstance(layer_idx, int) or layer_idx < 0:
            raise ValueError(f"layer_idx: expected a non-negative int, got {layer_idx!r}")
        if "seen_tokens" in states:
            raise ValueError("update_states: 'seen_tokens' is advanced through `offset`, not set as a state")
        while len(self.layers) <= layer_idx:
            self.layers.append(FastWeightLayer())
        self.layers[layer_idx].store(offset, states)
        return self.layers[layer_idx].states

    def _check_snapshot(self, snapshot, method: str):
        if not isinstance(snapshot, FastWeightCache):
            got = type(snapshot).__name__
            raise TypeError(f"{method}: expected a FastWeightCache (from snapshot()), got {got}")

    def snapshot(self) -> "FastWeightCache":
        """A deep copy whose tensors are detached clones: later updates of this cache leave it unchanged."""
        copy = FastWeightCache()
        copy.layers = [
            FastWeightLayer({name: value if name == "seen_tokens" else _map(value, _copy)
                             for name, value in layer.states.items()})
            for layer in self.layers
        ]
        return copy

    def restore(self, snapshot: "FastWeightCache") -> "FastWeightCache":
        """Puts this cache back to `snapshot`'s states (copied, so the snapshot can be restored again)."""
        self._check_snapshot(snapshot, "restore")
        self.layers = snapshot.snapshot().layers
        return self

    def update_norms(self, snapshot: "FastWeightCache") -> Dict[int, Dict[str, Optional[float]]]:
        """How far each layer's states moved since `snapshot`: {layer: {state: ||now - then||}}, the Frobenius norm
        over the floating tensors of the state (counters and positions left out). A state absent from the snapshot
        or whose shapes changed (a growing KV cache) reports None: there is nothing to subtract."""
        self._check_snapshot(snapshot, "update_norms")
        norms: Dict[int, Dict[str, Optional[float]]] = {}
        for i, layer in enumerate(self.layers):
            then = snapshot[i] if i < len(snapshot) else {}
            norms[i] = {}
            for name, value in layer.states.items():
                if name == "seen_tokens":
                    continue
                now_t = value if isinstance(value, tuple) else (value,)
                old = then.get(name)
                old_t = old if isinstance(old, tuple) else (old,)
                if old is None or len(old_t) != len(now_t) or any(a.shape != b.shape for a, b in zip(now_t, old_t)):
                    norms[i][name] = None
                    continue
                squares = [(a.detach().double() - b.detach().double().to(a.device)).pow(2).sum()
                           for a, b in zip(now_t, old_t) if a.is_floating_point()]
                norms[i][name] = float(torch.stack(squares).sum().sqrt()) if squares else 0.0
        return norms

    def reset(self) -> "FastWeightCache":
        """Forgets every state: the next call starts from scratch, as with a fresh cache."""
        self.layers = []
        return self

    def save(self, path: str):
        """Writes every state to a safetensors file; the layout and "seen_tokens" go in its metadata."""
        from safetensors.torch import save_file

        tensors: Dict[str, torch.Tensor] = {}
        layout = []
        for i, layer in enumerate(self.layers):
            entry = {"seen_tokens": layer.states.get("seen_tokens"), "states": {}}
            for name, value in layer.states.items():
                if name == "seen_tokens":
                    continue
                if isinstance(value, tuple):
                    entry["states"][name] = len(value)
                    tensors.update({f"{i}.{name}.{j}": _copy(t).contiguous() for j, t in enumerate(value)})
                else:
                    entry["states"][name] = None
                    tensors[f"{i}.{name}"] = _copy(value).contiguous()
            layout.append(entry)
        save_file(tensors, path, metadata={"format": _FORMAT, "layout": json.dumps(layout)})

    def load(self, path: str, device: Union[str, torch.device] = "cpu") -> "FastWeightCache":
        """Replaces this cache's states with those saved at `path` (by `save`), on `device`."""
        from safetensors import safe_open

        with safe_open(path, framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != _FORMAT:
                raise ValueError(f"load: {path} is not a saved FastWeightCache (format {metadata.get('format')!r})")
            layers = []
            for i, entry in enumerate(json.loads(metadata["layout"])):
                states: Dict[str, object] = {}
                for name, count in entry["states"].items():
                    if count is None:
                        states[name] = f.get_tensor(f"{i}.{name}")
                    else:
                        states[name] = tuple(f.get_tensor(f"{i}.{name}.{j}") for j in range(count))
                if entry["seen_tokens"] is not None:
                    states["seen_tokens"] = entry["seen_tokens"]
                layers.append(FastWeightLayer(states))
        self.layers = layers
        return self
