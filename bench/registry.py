"""Benchmark cases: each op with its inputs, our implementation and its peers, one `OpCase` per entry.

Every implementation is called as `fn(**inputs)` on inputs in its own layout and returns the output `o`.
Peers are imported lazily inside `load`, so a missing package only marks its rows "not installed".
Adding an op (ttt, titans, memory layers) is one more `OpCase` in `CASES`.
"""

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

OURS, SAME_MATH, BASELINE = "ours", "same math", "baseline"


@dataclass(frozen=True)
class Shape:
    B: int
    T: int
    H: int
    K: int
    V: int
    chunk: int  # chunk size of our chunked path (and of the FLOP count)


@dataclass(frozen=True)
class Impl:
    label: str  # as shown in the table
    role: str  # OURS; SAME_MATH (verified against ours, speed-up = its time / ours); BASELINE (other math)
    load: Callable[[str, int], Callable]  # (our backend, chunk) -> fn(**inputs) -> o; ImportError if missing
    layout: Optional[Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]] = None  # untimed
    note: str = ""
    # (speed-up, peak ratio or None): ours fwd+bwd at the target length at least this much faster than this
    # implementation, with at most this fraction of its peak memory (its peak is then always profiled)
    goal: Optional[Tuple[float, Optional[float]]] = None
    max_T: Optional[int] = None  # timed only up to this length (a peer that would take minutes beyond it)


@dataclass(frozen=True)
class OpCase:
    name: str  # "<op>:<variant>"; `--ops <op>` selects every variant
    make_inputs: Callable[[Shape, torch.Generator], Dict[str, torch.Tensor]]  # [B, T, H, D] layout
    impls: Tuple[Impl, ...]  # ours first
    # FLOPs of our chunked forward (bench/README.md), for ops with a matmul-rate target; None: no such target
    fwd_flops: Optional[Callable[[Shape], float]] = None
    # (another case, r): ours fwd+bwd at the target length within r times that case's ours in the same run
    within: Optional[Tuple[str, float]] = None
    # (T, pass, fraction): the matmul-rate target of a case with fwd_flops; None: the forward at the target
    # length >= 30% (report.py)
    matmul_target: Optional[Tuple[int, str, float]] = None
    chunk: Optional[int] = None  # the chunk size this case always runs with; None: the run's --chunk

    def __post_init__(self):
        if not self.impls or self.impls[0].role != OURS or any(i.role == OURS for i in self.impls[1:]):
            raise ValueError(f"{self.name}: expected exactly one implementation of role {OURS!r}, listed first")

    @property
    def op(self) -> str:
        return self.name.split(":")[0]


def _fla(load: Callable[[], Callable]) -> Callable[[str, int], Callable]:
    """Wraps a peer loader: fla warns at import on machines without a GPU; the warning is noise here."""

    def loader(backend: str, chunk: int) -> Callable:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load()

    return loader


# ---- linear_attention: S_t = D_t S_{t-1} + k_t^T v_t, o_t = scale q_t S_t, for three forms of D_t ----

def _linear_attention_inputs(g_form: Optional[str]):
    def make(s: Shape, gen: torch.Generator) -> Dict[str, torch.Tensor]:
        randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
        inputs = {"q": randn(s.B, s.T, s.H, s.K), "k": randn(s.B, s.T, s.H, s.K), "v": randn(s.B, s.T, s.H, s.V)}
        if g_form == "scalar":
            inputs["g"] = F.logsigmoid(randn(s.B, s.T, s.H))  # [B, T, H] log-decay in (-inf, 0)
        elif g_form == "per_key":
            inputs["g"] = F.logsigmoid(randn(s.B, s.T, s.H, s.K))  # [B, T, H, K]
        return inputs

    return make


def _linear_attention_flops(s: Shape) -> float:
    """Per chunk of C positions and head: QK^T and AV (2C^2K + 2C^2V), q S and k^T v (2CKV each)."""
    padded_T = -(-s.T // s.chunk) * s.chunk
    return s.B * s.H * padded_T * (2 * s.chunk * (s.K + s.V) + 4 * s.K * s.V)


def _ours_linear_attention(backend: str, chunk: int) -> Callable:
    from ipl_layers.ops.linear_attention import linear_attention

    def fn(q, k, v, g=None):
        return linear_attention(q, k, v, g, backend=backend, chunk_size=chunk)[0]

    return fn


def _fla_chunk_linear_attn() -> Callable:
    from fla.ops.linear_attn.naive import naive_chunk_linear_attn  # [B, T, H, D] in and out, C = 64

    return lambda q, k, v: naive_chunk_linear_attn(q, k, v)


def _fla_chunk_simple_gla() -> Callable:
    from fla.ops.simple_gla.naive import naive_chunk_simple_gla  # [B, T, H, D], g [B, T, H] log-decay

    return lambda q, k, v, g: naive_chunk_simple_gla(q, k, v, g)[0]


def _fla_recurrent_gla() -> Callable:
    from fla.ops.gla.naive import naive_recurrent_gla  # [B, T, H, D], gk [B, T, H, K] log-decay

    return lambda q, k, v, g: naive_recurrent_gla(q, k, v, g)[0]


def _sdpa(backend: str, chunk: int) -> Callable:
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _sdpa_layout(inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """[B, T, H, D] -> SDPA's own [B, H, T, D], contiguous, so its timing holds no transpose copy."""
    return {name: inputs[name].transpose(1, 2).contiguous() for name in ("q", "k", "v")}


SDPA = Impl(
    "torch SDPA causal", BASELINE, _sdpa, layout=_sdpa_layout,
    note="softmax attention, different math: a reference point, not a peer",
)


def _linear_attention_case(variant: str, g_form: Optional[str], peer: Impl) -> OpCase:
    ours = Impl(f"ours linear_attention (g={g_form})", OURS, _ours_linear_attention)
    return OpCase(
        f"linear_attention:{variant}", _linear_attention_inputs(g_form), (ours, peer, SDPA), _linear_attention_flops
    )


CASES: Tuple[OpCase, ...] = (
    _linear_attention_case(
        "plain", None,
        Impl("fla naive_chunk_linear_attn", SAME_MATH, _fla(_fla_chunk_linear_attn), goal=(2.0, None),
             note="chunked, C=64"),
    ),
    _linear_attention_case(
        "scalar_decay", "scalar",
        Impl("fla naive_chunk_simple_gla", SAME_MATH, _fla(_fla_chunk_simple_gla), goal=(2.0, None),
             note="chunked, C=64"),
    ),
    _linear_attention_case(
        "key_decay", "per_key",
        Impl(
            "fla naive_recurrent_gla", SAME_MATH, _fla(_fla_recurrent_gla), goal=(2.0, None),
            note="token-by-token: fla has no pure-torch chunked GLA",
        ),
    ),
)


# ---- delta_rule: S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t ----

def _delta_rule_inputs(gated: bool):
    def make(s: Shape, gen: torch.Generator) -> Dict[str, torch.Tensor]:
        randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
        inputs = {
            "q": F.normalize(randn(s.B, s.T, s.H, s.K), dim=-1),  # unit q, k as DeltaNet layers make them
            "k": F.normalize(randn(s.B, s.T, s.H, s.K), dim=-1),
            "v": randn(s.B, s.T, s.H, s.V),
            "beta": torch.sigmoid(randn(s.B, s.T, s.H)),  # [B, T, H] learning rates in (0, 1)
        }
        if gated:
            inputs["g"] = F.logsigmoid(randn(s.B, s.T, s.H))  # [B, T, H] log-decay
        return inputs

    return make


def _ours_delta_rule(backend: str, chunk: int) -> Callable:
    from ipl_layers.ops.delta_rule import delta_rule

    def fn(q, k, v, beta, g=None):
        return delta_rule(q, k, v, beta, g, backend=backend, chunk_size=chunk)[0]

    return fn


def _fla_chunk_gated_delta_rule() -> Callable:
    from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule  # [B, T, H, D], g/beta [B, T, H]

    return lambda q, k, v, beta, g: naive_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=64)[0]


def _fla_chunk_delta_rule() -> Callable:
    from fla.ops.delta_rule.naive import delta_rule_chunkwise  # [B, H, T, D], beta [B, H, T]; T % chunk == 0

    def fn(q, k, v, beta):  # the layout moves are timed with it (< 1% of its time at T=4096)
        heads_first = [x.transpose(1, 2) for x in (q, k, v, beta)]
        return delta_rule_chunkwise(*heads_first, chunk_size=64)[0].transpose(1, 2)

    return fn


DELTA_RULE_CASES = (
    OpCase(
        "delta_rule:plain", _delta_rule_inputs(False),
        (Impl("ours delta_rule (g=None)", OURS, _ours_delta_rule),
         Impl("fla delta_rule_chunkwise", SAME_MATH, _fla(_fla_chunk_delta_rule), goal=(2.0, None),
              note="chunked, C=64; needs T % 64 == 0; its [B, H, T, D] layout moves are timed with it")),
    ),
    OpCase(
        "delta_rule:gated", _delta_rule_inputs(True),
        (Impl("ours delta_rule (g=scalar)", OURS, _ours_delta_rule),
         Impl("fla naive_chunk_gated_delta_rule", SAME_MATH, _fla(_fla_chunk_gated_delta_rule), goal=(2.0, None),
              note="chunked, C=64")),
    ),
)


# ---- ttt_linear: mini-batch GD on 1/2 ||LN(k W + b) - (v - k)||^2, o = q + LN(q W_i + b_i) ----

def _ttt_linear_inputs(s: Shape, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    return {
        "q": F.normalize(randn(s.B, s.T, s.H, s.K), dim=-1),
        "k": F.normalize(randn(s.B, s.T, s.H, s.K), dim=-1),
        "v": randn(s.B, s.T, s.H, s.V),
        "eta": torch.sigmoid(randn(s.B, s.T, s.H)) / s.K,  # the paper's base lr 1 / head dim times a sigmoid
        "ln_weight": torch.ones(s.H, s.K),
        "ln_bias": torch.zeros(s.H, s.K),
        "W0": 0.02 * randn(s.B, s.H, s.K, s.K),  # a learnable non-zero start, as the layer has
        "b0": torch.zeros(s.B, s.H, s.K),
    }


def _ours_ttt_linear(backend: str, chunk: int) -> Callable:
    from ipl_layers.ops.ttt_linear import ttt_linear

    def fn(q, k, v, eta, ln_weight, ln_bias, W0, b0):
        return ttt_linear(q, k, v, eta, ln_weight=ln_weight, ln_bias=ln_bias, mini_batch_size=16,
                          initial_state=(W0, b0), backend=backend)[0]

    return fn


def _fla_ttt_linear() -> Callable:
    from fla.ops.ttt.naive import chunk_ttt_linear_ref  # [B, T, H, D]; eta [B, T, H, 1]; scales q in place

    def fn(q, k, v, eta, ln_weight, ln_bias, W0, b0):
        return chunk_ttt_linear_ref(q.clone(), k, v, ln_weight, ln_bias, eta[..., None], mini_batch_size=16,
                                    initial_state=W0, initial_state_bias=b0[:, :, None])[0]

    return fn


TTT_LINEAR_CASES = (
    OpCase(
        "ttt_linear:mb16", _ttt_linear_inputs,
        (Impl("ours ttt_linear (mini-batch 16)", OURS, _ours_ttt_linear),
         Impl("fla chunk_ttt_linear_ref", BASELINE, _fla(_fla_ttt_linear),
              note="fla's TTT-Linear reference: lr per query position, o + LN(o) output, q scaled: a speed peer")),
        within=("delta_rule:gated", 2.0),  # the cost of LN and mini-batch 16 stays bounded
    ),
)


# ---- ttt_mlp: the same loss and mini-batch GD with the inner MLP gelu(x W1 + b1) W2 + b2 (F = 4K) ----

def _ttt_mlp_inputs(s: Shape, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    inputs = _ttt_linear_inputs(s, gen)
    del inputs["W0"], inputs["b0"]
    Fd = 4 * s.K
    inputs.update(W1=randn(s.B, s.H, s.K, Fd) / s.K**0.5, b1=torch.zeros(s.B, s.H, Fd),
                  W2=randn(s.B, s.H, Fd, s.K) / Fd**0.5, b2=torch.zeros(s.B, s.H, s.K))
    return inputs


def _ours_ttt_mlp(backend: str, chunk: int) -> Callable:
    from ipl_layers.ops.ttt_mlp import ttt_mlp

    def fn(q, k, v, eta, ln_weight, ln_bias, W1, b1, W2, b2):
        return ttt_mlp(q, k, v, eta, ln_weight=ln_weight, ln_bias=ln_bias, mini_batch_size=16,
                       initial_state=(W1, b1, W2, b2), backend=backend)[0]

    return fn


TTT_MLP_CASES = (
    OpCase("ttt_mlp:mb16", _ttt_mlp_inputs, (Impl("ours ttt_mlp (mini-batch 16, F = 4K)", OURS, _ours_ttt_mlp),),
           within=("ttt_linear:mb16", 4.0)),
)



# ---- titans: the Titans neural memory as a layer, ours vs titans-pytorch's NeuralMemory (layer vs layer) ----

def _titans_inputs(s: Shape, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    return {"x": torch.randn(s.B, s.T, s.H, s.K, generator=gen)}  # hidden states, [B, T, H * K] once flattened


def _hidden_layer(build: Callable[[int, int, int, str], torch.nn.Module], returns_tuple: bool = True
                  ) -> Callable[[str, int], Callable]:
    """fn(x [B, T, H, K]) -> the layer's output on x.flatten(-2) (the first element of a tuple output); one layer
    per (H, K), built (seeded, untimed after the first call) from the head count and head dim of the inputs."""

    def loader(backend: str, chunk: int) -> Callable:
        layers: Dict[Tuple[int, int], torch.nn.Module] = {}
        last = []

        def fn(x):  # fn.parameters(): the last-called layer's parameters, differentiated in fwd+bwd as inputs are
            H, K = x.shape[-2:]
            last[:] = [(H, K)]
            if (H, K) not in layers:
                torch.manual_seed(0)
                layers[(H, K)] = build(H, K, chunk, backend)
            out = layers[(H, K)](x.flatten(-2))
            return out[0] if returns_tuple else out

        fn.parameters = lambda: list(layers[last[0]].parameters())
        return fn

    return loader


def _ours_titans(H: int, K: int, chunk: int, backend: str) -> torch.nn.Module:
    from ipl_layers.layers import TitansMemory

    return TitansMemory(H * K, num_heads=H, depth=2, expand=4, chunk_size=chunk, backend=backend)


def _titans_pytorch(H: int, K: int, chunk: int, backend: str) -> torch.nn.Module:
    from titans_pytorch import NeuralMemory

    return NeuralMemory(H * K, chunk_size=chunk, heads=H, dim_head=K,
                        default_model_kwargs=dict(depth=2, expansion_factor=4.0))


def _titans_linear_inputs(s: Shape, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """A depth-1 (linear) memory with the x + LN(x W) wrapper, the form fla's Titans reference implements."""
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    gate = lambda bias: torch.sigmoid(randn(s.B, s.T, s.H) + bias)  # noqa: E731  [B, T, H]
    return {"q": F.normalize(randn(s.B, s.T, s.H, s.K), dim=-1), "k": F.normalize(randn(s.B, s.T, s.H, s.K), dim=-1),
            "v": randn(s.B, s.T, s.H, s.K), "theta": 0.1 * gate(0.0), "eta": gate(0.0), "alpha": gate(-5.0),
            "ln_weight": torch.ones(s.H, s.K), "ln_bias": torch.zeros(s.H, s.K),
            "W": 0.02 * randn(s.B, s.H, s.K, s.K)}


def _ours_titans_linear(backend: str, chunk: int) -> Callable:
    from ipl_layers.ops import titans_memory

    def fn(q, k, v, theta, eta, alpha, ln_weight, ln_bias, W):
        return titans_memory(q, k, v, theta, eta, alpha, ln_weight=ln_weight, ln_bias=ln_bias, chunk_size=chunk,
                             initial_state=(W,), use_ln=True, use_residual=True, backend=backend)[0]

    return fn


def _fla_titans_linear() -> Callable:
    from fla.ops.titans.naive import chunk_titans_linear_ref  # [B, T, H, D]; gates [B, T, H, 1]

    def fn(q, k, v, theta, eta, alpha, ln_weight, ln_bias, W):
        return chunk_titans_linear_ref(q, k, v, ln_weight, ln_bias, theta[..., None], alpha[..., None],
                                       eta[..., None], chunk_size=64, initial_state=W)[0]

    return fn


TITANS_CASES = (
    OpCase(
        "titans:linear", _titans_linear_inputs,
        (Impl("ours titans_memory (depth 1, x + LN(x W))", OURS, _ours_titans_linear),
         Impl("fla chunk_titans_linear_ref", BASELINE, _fla(_fla_titans_linear), max_T=1024,
              note="fla's Titans reference (linear memory, chunk 64): momentum and decay per token, every gradient "
                   "at the chunk's start weights as ours; output o + LN(o), retrieval before the chunk's "
                   "updates: a speed peer; about 40 s a forward+backward at T = 1024, so not timed beyond")),
    ),
    OpCase(
        "titans:layer", _titans_inputs,
        (Impl("ours TitansMemory layer (depth 2, F = 4K)", OURS, _hidden_layer(_ours_titans),
              note="projections, short convs, gates, the memory (gradients at chunk starts, token-level momentum "
                   "and forgetting), RMSNorm, o_proj"),
         Impl("titans-pytorch NeuralMemory", BASELINE, _hidden_layer(_titans_pytorch), goal=(5.0, 0.5),
              note="same chunk size and memory depth/width; other math: one gradient per chunk (vmap over "
                   "chunks), lr/momentum/decay per chunk, retrieval from the weights before the chunk")),
    ),
)



# ---- memory: product-key memory layers (hidden = H * K, 4 heads, N = n^2 value rows, k = 32 per head) ----

def _pkm_ours(num_keys: int, sparse_grad: bool = False) -> Callable[[int, int, int, str], torch.nn.Module]:
    def build(H: int, K: int, chunk: int, backend: str) -> torch.nn.Module:
        from ipl_layers.layers import ProductKeyMemory

        return ProductKeyMemory(H * K, num_heads=4, num_keys=num_keys, topk=32, key_dim=256,
                                sparse_grad=sparse_grad, backend=backend)

    return build


class _TorchBagPKM(torch.nn.Module):
    """Our layer with its bag read by torch's `F.embedding_bag` (torch's own backward): the same math."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        from ipl_layers.ops import product_key_topk

        m = self.layer
        scores, slots = product_key_topk(m._query(x), m.keys, m.topk)  # [B, T, H, k]
        n = m.num_heads * m.topk
        weights = torch.softmax(scores, -1).reshape(-1, n)
        out = F.embedding_bag(slots.reshape(-1, n), m.values, per_sample_weights=weights, mode="sum",
                              sparse=m.sparse_grad)
        return out.reshape(*x.shape[:-1], -1)


def _pkm_peer(H: int, K: int, chunk: int, backend: str) -> torch.nn.Module:
    from product_key_memory import PKM

    return PKM(H * K, heads=4, num_keys=256, topk=32, dim_head=128)  # queries 2 x 128 per head, as ours


MEMORY_CASES = (
    OpCase(
        "memory:pkm", _titans_inputs,
        (Impl("ours ProductKeyMemory (N = 256^2, k = 32, 4 heads, sparse value gradient)", OURS,
              _hidden_layer(_pkm_ours(256, sparse_grad=True), False)),
         Impl("torch F.embedding_bag read", SAME_MATH,
              _hidden_layer(lambda *a: _TorchBagPKM(_pkm_ours(256, sparse_grad=True)(*a)), False),
              note="our layer and search, torch's embedding_bag (its sparse backward) for the read"),
         Impl("product-key-memory PKM", BASELINE, _hidden_layer(_pkm_peer, False), goal=(2.0, None),
              note="lucidrains' PKM with the same heads, keys, k and query dims; dense value gradient")),
    ),
    OpCase(
        "memory:pkm_1M", _titans_inputs,
        (Impl("ours ProductKeyMemory (N = 1024^2, k = 32, 4 heads, sparse value gradient)", OURS,
              _hidden_layer(_pkm_ours(1024, sparse_grad=True), False)),),
    ),
)


# ---- lact: SwiGLU fast weight (F = K), apply-then-update once per large chunk, momentum and renorm on ----

def _lact_inputs(s: Shape, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    base = math.log(math.expm1(1e-3))  # the layer's lr = softplus(W x + b + softplus^-1(1e-3))
    return {
        "q": F.normalize(randn(s.B, s.T, s.H, s.K), dim=-1),  # unit q, k as the layer makes them
        "k": F.normalize(randn(s.B, s.T, s.H, s.K), dim=-1),
        "v": randn(s.B, s.T, s.H, s.V),
        "lr": F.softplus(randn(s.B, s.T, s.H, 3) + base),  # [B, T, H, 3] for W0, W1, W2
        "momentum": torch.sigmoid(randn(s.B, s.T, s.H)),
        "W0": randn(s.B, s.H, s.K, s.K) / s.K**0.5,  # the authors' init, F = K (their default)
        "W1": randn(s.B, s.H, s.K, s.V) / s.K**0.5,
        "W2": randn(s.B, s.H, s.K, s.K) / s.K**0.5,
    }


def _lact_flops(s: Shape) -> float:
    """Per head, F = K: every padded position applies f (q W0, q W2: 2KF each; h W1: 2FV), and every chunk
    that is complete and not the last learns from its C positions (k W0, k W2, v W1^T, and the three weight
    gradients: 8KF + 4FV per position). Muon is off; momentum and renorm are O(KF) per chunk."""
    Fd, chunks = s.K, -(-s.T // s.chunk)
    updates = min(s.T // s.chunk, chunks - 1)
    apply = chunks * s.chunk * (4 * s.K * Fd + 2 * Fd * s.V)
    learn = updates * s.chunk * (8 * s.K * Fd + 4 * Fd * s.V)
    return s.B * s.H * (apply + learn)


def _ours_lact(backend: str, chunk: int) -> Callable:
    from ipl_layers.ops.lact import lact

    def fn(q, k, v, lr, momentum, W0, W1, W2):
        return lact(q, k, v, lr, chunk_size=chunk, initial_state=(W0, W1, W2), momentum=momentum, backend=backend)[0]

    return fn


LACT_CASES = (
    OpCase("lact:chunk2048", _lact_inputs, (Impl("ours lact (chunk 2048, F = K, momentum, renorm)", OURS, _ours_lact),),
           fwd_flops=_lact_flops, matmul_target=(8192, "fwd+bwd", 0.50), chunk=2048),
)

CASES = CASES + DELTA_RULE_CASES + TTT_LINEAR_CASES + TTT_MLP_CASES + TITANS_CASES + MEMORY_CASES + LACT_CASES


def select(names) -> Tuple[OpCase, ...]:
    """Cases named exactly, or every variant of a named op; all of them for None."""
    if not names:
        return CASES
    chosen = tuple(c for c in CASES if c.name in names or c.op in names)
    unknown = set(names) - {c.name for c in CASES} - {c.op for c in CASES}
    if unknown:
        raise SystemExit(f"--ops: unknown {sorted(unknown)}; known: {[c.name for c in CASES]}")
    return chosen
