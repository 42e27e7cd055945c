"""The fast-weight states of the layers that learn by gradient descent, as the ops take and return them.

A state holds what a call that stopped anywhere inside a mini-batch or chunk needs to continue exactly: the weights
the open mini-batch started from, its gradient sums (or momentum) so far, and its position. Every field is a tensor
with the sequences first, so `ipl_layers.cache.FastWeightCache` can copy, reorder, snapshot and save a state like
any other tensor or tuple of tensors.
"""

from typing import NamedTuple, Tuple

import torch


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
