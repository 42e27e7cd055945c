"""`lact` (LaCT) on the torch path against the float64 chunk-by-chunk reference (whose gradients come from
`torch.func.grad`, not the closed form): outputs, final state and the gradients of q, k, v, lr, momentum and
every field of the initial state, over momentum / Muon / renorm, unaligned lengths, varlen with empty sequences
and open chunks, and prefill + decode."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import assert_rel_rms, compare, rel_rms
from ipl_layers.ops import lact, lact_reference
from ipl_layers.ops.lact import _orthogonalize
from ipl_layers.ops.lact_chunk import newton_schulz
from ipl_layers.state import LaCTState

# Bounds on the relative RMS error against the float64 reference, on outputs, final states and every gradient.
# float64 agrees to rounding: measured <= 3e-13 with Muon, <= 5e-16 without. fp32 at T = 45, K = 8, F = 16,
# C = 8 measured <= 3.0e-7 without Muon (dinit_lr, dinit_k the worst) and <= 1.1e-4 with it (dlr; 1.4e-5 with
# momentum): the Newton-Schulz quintic has slope 3.4 at zero, so over five steps it amplifies the rounding of
# the small singular values of a low-rank chunk gradient ~3.4^5-fold. Each bound leaves ~10x headroom.
BOUND_F64 = 1e-10
BOUND_F32 = 3e-6
BOUND_F32_MUON = 1e-3
FIELDS = LaCTState._fields[:-1]
FLAGS = [dict(momentum=m, use_muon=u, renorm=r) for m, u, r in itertools.product([True, False], repeat=3)]


def flag_id(flags):
    return "-".join(name for name, on in zip(("momentum", "muon", "renorm"), flags.values()) if on) or "plain"


def make_inputs(B, T, H, K, C, dtype, V=None, Fd=None, lengths=None, positions=None, momentum=True, seed=0):
    """Unit-norm q and k (as the layer makes them), lr in (0, 0.5), momentum gates in (0, 1), start weights with
    unit-scale activations; `positions` (one per sequence): start mid-chunk from a full random state (momentum
    buffers, renorm targets, buffered open-chunk rows)."""
    gen = torch.Generator().manual_seed(seed)
    V, Fd = V or K, Fd or 2 * K
    Bq = 1 if lengths is not None else B
    N = B if lengths is None else len(lengths)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k = F.normalize(rnd(Bq, T, H, K), dim=-1), F.normalize(rnd(Bq, T, H, K), dim=-1)
    v = rnd(Bq, T, H, V)
    lr = 0.5 * torch.rand(Bq, T, H, 3, generator=gen, dtype=torch.float64)
    mom = torch.rand(Bq, T, H, generator=gen, dtype=torch.float64) if momentum else None
    state = [rnd(N, H, K, Fd) / K**0.5, rnd(N, H, Fd, V) / Fd**0.5, rnd(N, H, K, Fd) / K**0.5]
    if positions is not None:
        pos = torch.tensor(positions)
        opened = (torch.arange(C)[None] < pos[:, None]).double()  # [N, C]
        moments = [0.1 * rnd(*w.shape) for w in state]
        norms = [w.norm(dim=-2) * (1 + 0.1 * torch.rand(w.shape[-1], generator=gen, dtype=torch.float64))
                 for w in state]
        buffers = [F.normalize(rnd(N, C, H, K), dim=-1), rnd(N, C, H, V),
                   0.5 * torch.rand(N, C, H, 3, generator=gen, dtype=torch.float64),
                   torch.rand(N, C, H, generator=gen, dtype=torch.float64)]
        buffers = [b * opened.view(N, C, *[1] * (b.dim() - 2)) for b in buffers]
        state += moments + norms + buffers
    cu = None if lengths is None else torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    cast = lambda x: None if x is None else x.to(dtype).requires_grad_()  # noqa: E731
    return [cast(x) for x in (q, k, v, lr, mom, *state)] + [None if positions is None else torch.tensor(positions)], cu


def initial_state(state):
    return tuple(state[:3]) if state[-1] is None else LaCTState(*state)


def run(backend, inputs, cu, C, use_muon=False, renorm=True, momentum=True):
    """Output, final state and gradients of all inputs for fixed random cotangents."""
    q, k, v, lr, mom, *state = inputs
    o, final = lact(q, k, v, lr, chunk_size=C, initial_state=initial_state(state), output_final_state=True,
                    cu_seqlens=cu, momentum=mom if momentum else None, use_muon=use_muon, renorm=renorm,
                    backend=backend)
    gen = torch.Generator().manual_seed(1)
    outs = (o, *final[:-1])
    cot = [torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype) for x in outs]
    loss = sum((x * c).sum() for x, c in zip(outs, cot))
    names = ["q", "k", "v", "lr", "momentum", *(f"init_{n}" for n in FIELDS)]
    present = [(n, x) for n, x in zip(names, inputs[:-1]) if x is not None and (momentum or n != "momentum")]
    grads = torch.autograd.grad(loss, [x for _, x in present], allow_unused=True, materialize_grads=True)
    return {"o": o, **dict(zip(FIELDS, final[:-1])), "position": final.position,
            **{f"d{n}": d for (n, _), d in zip(present, grads)}}


def reference(inputs, cu, C, **flags):
    leaves = [None if x is None else x.detach().double().requires_grad_() for x in inputs[:-1]]
    return run("reference", leaves + inputs[-1:], cu, C, **flags)


@pytest.mark.parametrize("flags", FLAGS, ids=flag_id)
def test_flag_combinations_float64(flags):
    inputs, cu = make_inputs(2, 13, 2, 4, 4, torch.float64, V=3, Fd=6, positions=[1, 3])
    compare(run("torch", inputs, cu, 4, **flags), reference(inputs, cu, 4, **flags), BOUND_F64)


@pytest.mark.parametrize("T", [0, 1, 8, 9])
@pytest.mark.parametrize("C", [1, 4])
def test_lengths_and_chunk_sizes_float64(T, C):
    inputs, cu = make_inputs(2, T, 1, 4, C, torch.float64)
    compare(run("torch", inputs, cu, C), reference(inputs, cu, C), BOUND_F64)


def bound_f32(flags) -> float:
    return BOUND_F32_MUON if flags.get("use_muon") else BOUND_F32


@pytest.mark.parametrize("flags", [FLAGS[0], FLAGS[4], FLAGS[-1]], ids=flag_id)
def test_float32(flags):
    inputs, cu = make_inputs(2, 45, 2, 8, 8, torch.float32, Fd=16, positions=[0, 5])
    compare(run("torch", inputs, cu, 8, **flags), reference(inputs, cu, 8, **flags), bound_f32(flags))


@pytest.mark.parametrize("dtype,bound", [(torch.float64, BOUND_F64), (torch.float32, BOUND_F32_MUON)])
def test_varlen_with_empty_sequences_mid_chunk(dtype, bound):
    inputs, cu = make_inputs(4, 27, 2, 4, 4, dtype, lengths=[9, 0, 15, 3], positions=[3, 1, 0, 2])
    compare(run("torch", inputs, cu, 4, use_muon=True), reference(inputs, cu, 4, use_muon=True), bound)


@settings(max_examples=8)
@given(
    lengths=st.lists(st.integers(0, 60), min_size=1, max_size=3),
    packed=st.booleans(),
    C=st.sampled_from([4, 7, 16]),
    flags=st.sampled_from(FLAGS),
    mid=st.booleans(),
)
def test_torch_path_hypothesis(lengths, packed, C, flags, mid):
    count = len(lengths) if packed else 1
    positions = [(3 * n + 1) % C for n in range(count)] if mid else None
    if packed:
        inputs, cu = make_inputs(count, sum(lengths), 2, 4, C, torch.float32, lengths=lengths, positions=positions)
    else:
        inputs, cu = make_inputs(1, lengths[0], 2, 4, C, torch.float32, positions=positions)
    compare(run("torch", inputs, cu, C, **flags), reference(inputs, cu, C, **flags), bound_f32(flags))


def test_gradcheck():
    # the whole op, float64, every differentiable input and state field at once: finite differences
    inputs, _ = make_inputs(1, 6, 1, 2, 4, torch.float64, V=2, Fd=3, positions=[1])
    q, k, v, lr, mom, *state = inputs

    def f(*xs):
        o, final = lact(*xs[:4], momentum=xs[4], chunk_size=4, initial_state=LaCTState(*xs[5:], state[-1]),
                        output_final_state=True, use_muon=True, backend="torch")
        return (o, *final[:-1])

    assert torch.autograd.gradcheck(f, [q, k, v, lr, mom, *state[:-1]])


@pytest.mark.parametrize("split", [0, 3, 4, 7, 13])
def test_state_carries_across_calls(split):
    # two calls split anywhere, on a chunk boundary or inside one, equal one call
    (q, k, v, lr, mom, *state), _ = make_inputs(2, 13, 2, 4, 4, torch.float64)
    kw = dict(chunk_size=4, output_final_state=True, use_muon=True)
    o, final = lact(q, k, v, lr, momentum=mom, initial_state=state[:3], **kw)
    parts = [x[:, :split] for x in (q, k, v, lr, mom)], [x[:, split:] for x in (q, k, v, lr, mom)]
    o1, mid = lact(*parts[0][:4], momentum=parts[0][4], initial_state=state[:3], **kw)
    assert mid.position.tolist() == [split % 4] * 2
    o2, final2 = lact(*parts[1][:4], momentum=parts[1][4], initial_state=mid, **kw)
    assert_rel_rms("o", torch.cat([o1, o2], 1), o, BOUND_F64)
    for name, x, y in zip(FIELDS, final2, final):
        assert_rel_rms(name, x, y, BOUND_F64)
    assert torch.equal(final2.position, final.position)


@pytest.mark.parametrize("momentum", [True, False])
def test_prefill_then_decode_equals_one_call(momentum):
    # varlen prefill (one sequence empty), then token-by-token decode of all sequences as a batch: every decode
    # step applies the committed weights, and the step that fills a chunk runs its update
    (q, k, v, lr, mom, *state), _ = make_inputs(3, 11, 2, 4, 4, torch.float64, momentum=momentum)
    kw = dict(chunk_size=4, output_final_state=True, use_muon=True)
    o, final = lact(q, k, v, lr, momentum=mom, initial_state=state[:3], **kw)
    lengths = [5, 0, 7]
    cu = torch.tensor([0, 5, 5, 12])
    seqs = (q, k, v, lr) if mom is None else (q, k, v, lr, mom)
    packed = [torch.cat([x[n, :L] for n, L in enumerate(lengths)])[None] for x in seqs]
    o_pre, cur = lact(*packed[:4], momentum=packed[4] if momentum else None, initial_state=state[:3], cu_seqlens=cu,
                      **kw)
    outs = [list(o_pre[0, cu[n]:cu[n + 1]].unbind(0)) for n in range(3)]
    for t in range(11 - min(lengths)):
        rows = [min(lengths[n] + t, 10) for n in range(3)]  # sequences already at the end repeat their last token
        step = [torch.stack([x[n, r] for n, r in enumerate(rows)])[:, None] for x in seqs]
        o_t, new = lact(*step[:4], momentum=step[4] if momentum else None, initial_state=cur, **kw)
        live = torch.tensor([lengths[n] + t < 11 for n in range(3)])
        cur = LaCTState(*(torch.where(live.view(-1, *[1] * (x.dim() - 1)), y, x) for x, y in zip(cur, new)))
        for n in range(3):
            if live[n]:
                outs[n].append(o_t[n, 0])
    assert_rel_rms("o", torch.stack([torch.stack(x) for x in outs]), o, BOUND_F64)
    for name, x, y in zip(FIELDS, cur, final):
        assert_rel_rms(name, x, y, BOUND_F64)
    assert torch.equal(cur.position, final.position)


def test_last_output_uses_the_committed_weights():
    # T = 11, C = 4: the last token sits in the open third chunk, so o_T = f(q_T) with the final state's weights
    (q, k, v, lr, mom, *state), _ = make_inputs(2, 11, 2, 4, 4, torch.float64)
    o, final = lact(q, k, v, lr, momentum=mom, chunk_size=4, initial_state=state[:3], output_final_state=True)
    assert final.position.tolist() == [3, 3]
    hidden = F.silu(torch.einsum("bhk,bhkf->bhf", q[:, -1], final.W0)) * torch.einsum("bhk,bhkf->bhf", q[:, -1],
                                                                                         final.W2)
    assert_rel_rms("o", o[:, -1], torch.einsum("bhf,bhfv->bhv", hidden, final.W1), BOUND_F64)
    assert torch.equal(final.k[:, :3], k[:, 8:].detach()) and not final.k[:, 3:].any()


def test_an_update_raises_the_dot_product_it_descends():
    # the sign convention: one small plain gradient step on a chunk increases sum_i lr_i <f(k_i), v_i>
    (q, k, v, lr, _, *state), _ = make_inputs(1, 8, 2, 4, 8, torch.float64)
    lr = torch.full_like(lr, 1e-3)
    _, final = lact(q, k, v, lr, chunk_size=8, initial_state=state[:3], output_final_state=True, renorm=False)

    def score(W0, W1, W2):
        h = F.silu(torch.einsum("bthk,bhkf->bthf", k, W0)) * torch.einsum("bthk,bhkf->bthf", k, W2)
        return (torch.einsum("bthf,bhfv->bthv", h, W1) * v).sum()

    assert score(*final[:3]) > score(*state[:3])


@pytest.mark.parametrize("shape", [(3, 5, 5), (2, 4, 7), (2, 7, 4)])
def test_newton_schulz_orthogonalises_and_matches_the_plain_iteration(shape):
    G = torch.randn(*shape, dtype=torch.float64)
    X = newton_schulz(G)
    assert_rel_rms("newton_schulz", X, _orthogonalize(G), BOUND_F64)
    s = torch.linalg.svdvals(X)  # the quintic drives singular values into roughly [0.7, 1.2], not exactly 1
    assert bool(((s > 0.6) & (s < 1.25)).all()), s


def test_low_precision_inputs_give_v_dtype_and_fp32_state():
    inputs, cu = make_inputs(1, 40, 2, 8, 16, torch.bfloat16)
    got, ref = run("torch", inputs, cu, 16), reference(inputs, cu, 16)
    assert got["o"].dtype == torch.bfloat16 and got["W0"].dtype == torch.float32
    for name in ("o", "dq", "dk", "dv", "dlr"):  # at most 2x the error of rounding the exact result to bf16
        assert_rel_rms(name, got[name], ref[name], 2 * rel_rms(ref[name].to(torch.bfloat16), ref[name]))


def test_default_backend_and_bad_backend(monkeypatch):
    monkeypatch.delenv("IPL_BACKEND", raising=False)
    (q, k, v, lr, _, *state), _ = make_inputs(1, 9, 1, 4, 4, torch.float64)
    kw = dict(chunk_size=4, initial_state=state[:3])
    assert_rel_rms("o", lact(q, k, v, lr, **kw)[0], lact_reference(q, k, v, lr, **kw)[0], BOUND_F64)
    monkeypatch.setenv("IPL_BACKEND", "nonsense")
    with pytest.raises(ValueError, match=r"IPL_BACKEND = 'nonsense' is not one of \('reference', 'torch'\)"):
        lact(q, k, v, lr, **kw)


def _qkvl(B=2, T=5, H=2, K=4):
    return [torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.rand(B, T, H, 3)]


def _weights(N=2, H=2, K=4, Fd=8):
    return [torch.zeros(N, H, K, Fd), torch.zeros(N, H, Fd, K), torch.zeros(N, H, K, Fd)]


def _state(position, C=4, N=2, H=2, K=4, Fd=8):
    W = _weights(N, H, K, Fd)
    return LaCTState(*W, *W, torch.ones(N, H, Fd), torch.ones(N, H, K), torch.ones(N, H, Fd), torch.zeros(N, C, H, K),
                     torch.zeros(N, C, H, K), torch.zeros(N, C, H, 3), torch.zeros(N, C, H), position)


@pytest.mark.parametrize(
    "args,kw,match",
    [
        (lambda: [*_qkvl()[:3], torch.rand(2, 5, 2)], {}, r"lr: expected 4-D \[B, T, H, 3\], got 3-D"),
        (lambda: [*_qkvl()[:3], torch.rand(2, 5, 2, 2)], {}, r"lr: expected shape \[B, T, H, 3\] = \[2, 5, 2, 3\]"),
        (_qkvl, dict(momentum=torch.rand(2, 5, 3)), r"momentum: expected shape \[B, T, H\] = \[2, 5, 2\]"),
        (_qkvl, dict(chunk_size=0), r"chunk_size: expected a positive int, got 0"),
        (_qkvl, {}, r"initial_state: expected start weights .* got None"),
        (_qkvl, dict(initial_state=torch.zeros(2, 2, 4, 8)), r"initial_state: expected a LaCTState or a tuple"),
        (_qkvl, dict(initial_state=[*_weights()[:2], torch.zeros(2, 2, 8, 4)]),
         r"initial_state W2: expected shape \[N, H, K, F\] = \[2, 2, 4, 8\], got \[2, 2, 8, 4\]"),
        (_qkvl, dict(initial_state=[torch.zeros(2, 2, 4, 8, dtype=torch.int64), *_weights()[1:]]),
         r"initial_state W0: expected a floating dtype"),
        (_qkvl, dict(initial_state=_state(torch.tensor([0, 4]))),
         r"initial_state position: expected values in \[0, chunk_size = 4\), got \[0, 4\]"),
        (_qkvl, dict(initial_state=_state(torch.tensor([0, 1]), C=8)),
         r"initial_state k: expected shape \[N, C, H, K\] = \[2, 4, 2, 4\], got \[2, 8, 2, 4\]"),
        (_qkvl, dict(initial_state=_state(torch.tensor([0.0, 1.0]))), r"initial_state position: expected an int32"),
    ],
)
def test_bad_inputs(args, kw, match):
    kw = {"chunk_size": 4, **kw}
    with pytest.raises((ValueError, TypeError), match=match):
        lact(*args(), backend="torch", **kw)
