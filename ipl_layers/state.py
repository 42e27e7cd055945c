"""`FastWeightCache`: the states a model carries from one call to the next, one dict per layer.

In-parameter-learning layers learn while they read: their fast weights (a linear-attention state
[N, H, K, V], short-conv histories [N, D, W-1], ...) are the memory of everything seen so far. The cache
holds them per layer index so that they can be carried across calls (prefill, then decode), and audited:

    cache = FastWeightCache()
    o, _, cache = layer(x, use_cache=True, past_key_values=cache)   # the layer stores its states
    before = cache.snapshot()                                       # deep, detached copy
    o, _, cache = layer(y, use_cache=True, past_key_values=cache)   # learns from y
    cache.update_norms(before)                                      # {layer: {state: ||now - before||}}
    cache.restore(before)                                           # roll the learning back
    cache.save("memory.safetensors"); FastWeightCache().load("memory.safetensors")
    cache.reset()                                                   # forget everything

Layer `i` holds a dict of named states, each a tensor or a tuple of tensors with the batch (or sequence)
first, plus "seen_tokens", the number of token positions it has processed (padding included, as
`transformers` counts the columns of the attention mask). The linear-attention layers store
"recurrent_state" (fp32 [N, H, K, V]) and, with short convolutions, "conv_state" (the (q, k, v) states).

The class is standalone, not a `transformers.cache_utils.Cache`: that base class (transformers 5.x) is a
list of key/value `CacheLayerMixin` objects whose `update(key_states, value_states, layer_idx)` cannot hold
arbitrary named states. `generate()` only needs what is here: `get_seq_length`, `is_compileable` (False,
so the 2-D padding mask reaches the layers untouched) and `reorder_cache` for beam search.
"""

import json
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import torch

State = Union[torch.Tensor, Tuple[torch.Tensor, ...]]

_FORMAT = "ipl_layers.FastWeightCache/1"


def _map(value: State, fn) -> State:
    """Applies `fn` to a state tensor, or to every tensor of a tuple state (keeping a state class's type: each
    is built from its tensors in order)."""
    if not isinstance(value, tuple):
        return fn(value)
    mapped = [fn(t) for t in value]
    return tuple(mapped) if type(value) is tuple else type(value)(*mapped)


def _position_scales(token_scale: torch.Tensor, position: torch.Tensor, H: int, dtype) -> torch.Tensor:
    """s_p per sequence and head [N, H] (p = position; 0 where p = 0: no open mini-batch)."""
    s = token_scale.to(dtype).expand(H, token_scale.shape[-1])  # [H, b]
    p = position.to(s.device)
    return torch.where(p[:, None] > 0, s[:, (p - 1).clamp(min=0)].T, 0.0)


class TTTLinearState(NamedTuple):
    """The fast weights of `ttt_linear` per sequence and head, with the open mini-batch's gradient sums.

    TTT-Linear takes every gradient of a mini-batch at the weights the mini-batch started from, and commits
    the update at its end. A sequence that stops mid-mini-batch (a prefill of any length, or each decoded
    token) therefore carries the start weights and the sums of its tokens' scaled gradients so far; the
    weights in effect after its last token are `weights(token_scale)`. The next call continues the open
    mini-batch, so prefill + token-by-token decode equals one forward over the whole sequence.
    """

    W: torch.Tensor  # [N, H, K, V] fp32: the weights the open mini-batch started from
    b: torch.Tensor  # [N, H, V] fp32: the bias it started from (zeros without bias)
    sum_W: torch.Tensor  # [N, H, K, V] fp32: sum_j eta_j k_j^T G_j over its tokens so far
    sum_b: torch.Tensor  # [N, H, V] fp32: sum_j eta_j G_j
    position: torch.Tensor  # [N] int64: its tokens so far, in [0, mini_batch_size); 0: sums are zero

    def weights(self, token_scale: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The weights in effect after the last token: W - s_p sum_W, b - s_p sum_b (p = position; W, b at 0).

        token_scale: the op's position scales s, [b] or [H, b] (for the default, 1 / arange(1, b + 1))."""
        s_p = _position_scales(token_scale, self.position, self.W.shape[1], self.W.dtype)  # [N, H]
        return self.W - s_p[..., None, None] * self.sum_W, self.b - s_p[..., None] * self.sum_b


class TTTMLPState(NamedTuple):
    """The fast weights of `ttt_mlp` per sequence and head (inner MLP K -> F -> K), with the open mini-batch's
    gradient sums; as `TTTLinearState`, for the two layers' weights and biases."""

    W1: torch.Tensor  # [N, H, K, F] fp32: the weights the open mini-batch started from
    b1: torch.Tensor  # [N, H, F] fp32
    W2: torch.Tensor  # [N, H, F, K] fp32
    b2: torch.Tensor  # [N, H, K] fp32
    sum_W1: torch.Tensor  # [N, H, K, F] fp32: sum_j eta_j dl_j/dW1 over its tokens so far
    sum_b1: torch.Tensor  # [N, H, F] fp32
    sum_W2: torch.Tensor  # [N, H, F, K] fp32
    sum_b2: torch.Tensor  # [N, H, K] fp32
    position: torch.Tensor  # [N] int64: its tokens so far, in [0, mini_batch_size); 0: sums are zero

    def weights(self, token_scale: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """(W1, b1, W2, b2) in effect after the last token: each start weight minus s_p times its sum."""
        s_p = _position_scales(token_scale, self.position, self.W1.shape[1], self.W1.dtype)  # [N, H]
        return tuple(w - s_p.view(*s_p.shape, *[1] * (w.dim() - 2)) * g for w, g in zip(self[:4], self[4:8]))


class TitansState(tuple):
    """The memory of `titans_memory` per sequence and head, as one flat tuple of tensors (so that the cache can
    copy, reorder and save it like any other state) for a memory MLP of depth L:

        (start_1..start_L, momentum_1..momentum_L, weights_1..weights_L, position)

    Titans takes every gradient of a chunk at the weights the chunk started from, while the momentum S and the
    weights M themselves move token by token (S_t = eta_t S_t-1 - theta_t grad, M_t = (1 - alpha_t) M_t-1 + S_t).
    A sequence that stops mid-chunk therefore carries three sets of L matrices: the open chunk's start weights
    (where its remaining tokens take their gradients), the momentum and the weights after its last token. At a
    chunk boundary (position 0) the start weights equal the weights.
    """

    def __new__(cls, *tensors: torch.Tensor):
        if len(tensors) < 4 or len(tensors) % 3 != 1:
            raise ValueError(f"TitansState: expected 3 L + 1 tensors (L >= 1), got {len(tensors)}")
        return super().__new__(cls, tensors)

    def __getnewargs__(self) -> Tuple[torch.Tensor, ...]:
        # copy/deepcopy/pickle rebuild through __new__(*tensors), not tuple's __new__(iterable)
        return tuple(self)

    @classmethod
    def of(cls, start, momentum, weights, position) -> "TitansState":
        return cls(*start, *momentum, *weights, position)

    @property
    def depth(self) -> int:
        return (len(self) - 1) // 3

    @property
    def start(self) -> Tuple[torch.Tensor, ...]:
        """[N, H, d_in, d_out] fp32 per layer: the weights the open chunk started from."""
        return tuple(self[: self.depth])

    @property
    def momentum(self) -> Tuple[torch.Tensor, ...]:
        """[N, H, d_in, d_out] fp32 per layer: S after the last token."""
        return tuple(self[self.depth : 2 * self.depth])

    @property
    def weights(self) -> Tuple[torch.Tensor, ...]:
        """[N, H, d_in, d_out] fp32 per layer: M after the last token, the weights the next query reads."""
        return tuple(self[2 * self.depth : 3 * self.depth])

    @property
    def position(self) -> torch.Tensor:
        """[N] int64: tokens of the open chunk so far, in [0, chunk_size)."""
        return self[-1]


class LaCTState(NamedTuple):
    """The fast weights of `lact` per sequence and head (SwiGLU x -> (silu(x W0) * (x W2)) W1), with what the
    next update needs: the momentum buffers, the norms the weights are renormalised to, and the open chunk.

    LaCT updates once per chunk of `chunk_size` tokens, counted from the start of the sequence. A call that
    stops inside a chunk (a prefill of any length, or each decoded token) has applied the committed weights
    to that chunk's queries but not yet learned from it: its keys, values, learning rates and momentum gates
    wait in the fixed-size buffers below until the chunk is complete, so prefill + token-by-token decode
    equals one forward over the whole sequence. Every field is a tensor (zeros where unused), so the cache
    can map over them.
    """

    W0: torch.Tensor  # [N, H, K, F] fp32: the weights after the last complete chunk
    W1: torch.Tensor  # [N, H, F, V] fp32
    W2: torch.Tensor  # [N, H, K, F] fp32
    M0: torch.Tensor  # [N, H, K, F] fp32: momentum buffers (the last update's gradient without momentum)
    M1: torch.Tensor  # [N, H, F, V] fp32
    M2: torch.Tensor  # [N, H, K, F] fp32
    norm0: torch.Tensor  # [N, H, F] fp32: the column norms of the sequence's initial W0, kept by renorm
    norm1: torch.Tensor  # [N, H, V] fp32: of its initial W1
    norm2: torch.Tensor  # [N, H, F] fp32: of its initial W2
    k: torch.Tensor  # [N, C, H, K] fp32: the open chunk's keys (rows >= position are zeros)
    v: torch.Tensor  # [N, C, H, V] fp32: its values
    lr: torch.Tensor  # [N, C, H, 3] fp32: its learning rates for W0, W1, W2
    momentum: torch.Tensor  # [N, C, H] fp32: its momentum gates (zeros without momentum)
    position: torch.Tensor  # [N] int64: tokens in the open chunk, in [0, chunk_size)


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone()


class FastWeightCache:
    """Per-layer fast-weight states, carried across calls; see the module docstring."""

    # Tells `generate()` not to build 4-D causal masks for us: the layers take the 2-D padding mask.
    is_compileable = False

    def __init__(self):
        self._layers: List[Dict[str, object]] = []

    def __len__(self) -> int:
        """One more than the highest layer index that has been updated (flash-linear-attention's convention)."""
        return len(self._layers)

    def __getitem__(self, layer_idx: int) -> Dict[str, object]:
        """The dict of layer `layer_idx`'s states (empty for a layer below len(self) that never stored any)."""
        return self._layers[layer_idx]

    def __repr__(self) -> str:
        layers = ", ".join(f"{i}: {sorted(k for k in d if k != 'seen_tokens')}" for i, d in enumerate(self._layers))
        return f"FastWeightCache({{{layers}}})"

    def update(self, layer_idx: int, *, offset: int, **states: Optional[State]) -> Dict[str, object]:
        """Stores the given states of layer `layer_idx` (replacing earlier ones; None values are skipped)
        and advances its "seen_tokens" by `offset`, the number of token positions just processed."""
        if not isinstance(layer_idx, int) or layer_idx < 0:
            raise ValueError(f"layer_idx: expected a non-negative int, got {layer_idx!r}")
        if "seen_tokens" in states:
            raise ValueError("update: 'seen_tokens' is advanced through `offset`, not set as a state")
        while len(self._layers) <= layer_idx:
            self._layers.append({})
        layer = self._layers[layer_idx]
        for name, value in states.items():
            if value is None:
                continue
            if isinstance(value, list):
                value = tuple(value)
            tensors = value if isinstance(value, tuple) else (value,)
            if not all(isinstance(t, torch.Tensor) for t in tensors):
                raise TypeError(f"update: state {name!r} must be a tensor or a tuple of tensors")
            layer[name] = value
        layer["seen_tokens"] = int(layer.get("seen_tokens", 0)) + int(offset)
        return layer

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Token positions processed by layer `layer_idx` (0 before its first update)."""
        if layer_idx >= len(self._layers):
            return 0
        return int(self._layers[layer_idx].get("seen_tokens", 0))

    def reorder_cache(self, beam_idx: torch.LongTensor):
        """Selects rows of every state along the batch dim (beam search)."""
        for layer in self._layers:
            for name, value in layer.items():
                if name != "seen_tokens":
                    layer[name] = _map(value, lambda t: t.index_select(0, beam_idx.to(t.device)))

    def snapshot(self) -> "FastWeightCache":
        """A deep copy whose tensors are detached clones: later updates of this cache leave it unchanged."""
        copy = FastWeightCache()
        copy._layers = [
            {name: (value if name == "seen_tokens" else _map(value, _copy)) for name, value in layer.items()}
            for layer in self._layers
        ]
        return copy

    def restore(self, snapshot: "FastWeightCache") -> "FastWeightCache":
        """Puts this cache back to `snapshot`'s states (copied, so the snapshot can be restored again)."""
        if not isinstance(snapshot, FastWeightCache):
            raise TypeError(f"restore: expected a FastWeightCache (from snapshot()), got {type(snapshot).__name__}")
        self._layers = snapshot.snapshot()._layers
        return self

    def update_norms(self, snapshot: "FastWeightCache") -> Dict[int, Dict[str, Optional[float]]]:
        """How far each layer's states moved since `snapshot`: {layer: {state: ||now - then||}}, the Frobenius norm
        over the floating tensors of the state (counters and positions left out). A state absent from the snapshot
        or whose shapes changed (a growing KV cache) reports None: there is nothing to subtract."""
        if not isinstance(snapshot, FastWeightCache):
            got = type(snapshot).__name__
            raise TypeError(f"update_norms: expected a FastWeightCache (from snapshot()), got {got}")
        norms: Dict[int, Dict[str, Optional[float]]] = {}
        for i, layer in enumerate(self._layers):
            then = snapshot._layers[i] if i < len(snapshot._layers) else {}
            norms[i] = {}
            for name, value in layer.items():
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
        self._layers = []
        return self

    def save(self, path: str):
        """Writes every state to a safetensors file; the layout and "seen_tokens" go in its metadata."""
        from safetensors.torch import save_file

        tensors: Dict[str, torch.Tensor] = {}
        layout = []
        for i, layer in enumerate(self._layers):
            entry = {"seen_tokens": layer.get("seen_tokens"), "states": {}}
            for name, value in layer.items():
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
                layer: Dict[str, object] = {}
                for name, count in entry["states"].items():
                    if count is None:
                        layer[name] = f.get_tensor(f"{i}.{name}")
                    else:
                        layer[name] = tuple(f.get_tensor(f"{i}.{name}.{j}") for j in range(count))
                if entry["seen_tokens"] is not None:
                    layer["seen_tokens"] = entry["seen_tokens"]
                layers.append(layer)
        self._layers = layers
        return self
