"""Tests of scan_kernels.py: the step-by-step definition against the equations unrolled by hand, both backends and the
dense einsum form against the definition, split consistency, stability, for the scalar decay (B, L, H) and the decay
per key channel (B, L, H, N).

Errors are measured as ||x - ref|| / ||ref|| against scan_reference, which computes in float64 from the same
(possibly low-precision) inputs. Tolerances by input dtype:
    float32   1e-5   sums of at most a few hundred products in float32 (unit roundoff 6e-8) stay below 1e-6
                     (per-channel: measured up to 1.4e-6, its factors exp(A_i - A_r) carry the same roundoff);
    float16   3e-3   the triton path rounds decayed scores and states to float16 (roundoff 4.9e-4) before its
                     matrix products, and outputs and gradients are rounded to float16;
    bfloat16  2e-2   the same roundings in bfloat16 (roundoff 3.9e-3), measured 4e-3 to 7e-3;
    float64   1e-12  the torch path computes in float64 for float64 inputs: what remains is float64 roundoff (1e-16)
                     over a few hundred operations, so anything above it is a wrong formula, not rounding.
"""
import sys

import pytest
import torch

from scan_kernels import HAS_TRITON, chunked_scan, dense_scan, scan_reference

TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}
BACKENDS = ["torch", "triton"]


def require_backend(backend):
    """The triton tests must run wherever requirements.txt installs triton (Linux): missing there is a failure."""
    if backend == "triton" and not HAS_TRITON:
        if sys.platform.startswith("linux"):
            pytest.fail("triton is not installed; run pip install -r requirements.txt")
        pytest.skip("triton has no wheel for this platform")


def relative_error(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def make_inputs(B, L, G, H, N, P, dtype=torch.float32, with_initial=True, contiguous=True, per_channel=False):
    """Random inputs with realistic scales: unit-norm-ish q, k, decays from weak to strong; log_decay (B, L, H), or
    (B, L, H, N) with per_channel."""
    q = torch.randn(B, L, G, N) / N ** 0.5
    k = torch.randn(B, L, G, N) / N ** 0.5
    v = torch.randn(B, L, H, P)
    decay_shape = (B, L, H, N) if per_channel else (B, L, H)
    log_decay = -torch.rand(decay_shape) * torch.tensor([0.05, 0.5, 2.0])[torch.randint(0, 3, decay_shape)]
    initial = torch.randn(B, H, P, N) if with_initial else None
    if not contiguous:  # the model hands over slices of a wider projection, as Mamba-2 does
        q = torch.cat([q, torch.randn(B, L, G, 3)], dim=-1)[..., :N]
        v = torch.cat([torch.randn(B, L, H, 5), v], dim=-1)[..., 5:]
    tensors = [q.to(dtype), k.to(dtype), v.to(dtype), log_decay, initial]
    return [t if t is None else t.detach().requires_grad_() for t in tensors]


def outputs_and_grads(scan, inputs, **kwargs):
    """y, final_state and the gradients of (y * gy).sum() + (final_state * gs).sum() for every input."""
    y, final = scan(*inputs, **kwargs)
    generator = torch.Generator().manual_seed(1)
    gy = torch.randn(y.shape, generator=generator)
    gs = torch.randn(final.shape, generator=generator)
    present = [t for t in inputs if t is not None]
    grads = torch.autograd.grad((y.float() * gy).sum() + (final.float() * gs).sum(), present)
    return [y, final, *grads]


@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar", "per-channel"])
@pytest.mark.core
def test_reference_matches_the_recurrence_unrolled_by_hand(per_channel):
    """scan_reference against S_t = exp(log_decay_t) S_{t-1} + v_t k_t^T, y_t = S_t q_t written out for 3 steps,
    head by head, with two heads reading one q/k group: the definition itself is checked, not only trusted."""
    B, L, G, H, N, P = 2, 3, 1, 2, 3, 2
    f64 = dict(dtype=torch.float64)
    q, k, v = torch.randn(B, L, G, N, **f64), torch.randn(B, L, G, N, **f64), torch.randn(B, L, H, P, **f64)
    log_decay = -torch.rand(*((B, L, H, N) if per_channel else (B, L, H)), **f64)
    initial = torch.randn(B, H, P, N, **f64)
    y, final = scan_reference(q, k, v, log_decay, initial)
    for b in range(B):
        for h in range(H):
            a = torch.exp(log_decay[b, :, h])  # (L,) or (L, N): a number, or one per column of the state
            s0 = a[0] * initial[b, h] + torch.outer(v[b, 0, h], k[b, 0, 0])
            s1 = a[1] * s0 + torch.outer(v[b, 1, h], k[b, 1, 0])
            s2 = a[2] * s1 + torch.outer(v[b, 2, h], k[b, 2, 0])
            expected = torch.stack([s0 @ q[b, 0, 0], s1 @ q[b, 1, 0], s2 @ q[b, 2, 0]])  # (L, P)
            assert relative_error(y[b, :, h], expected) < TOLERANCE[torch.float64]
            assert relative_error(final[b, h], s2) < TOLERANCE[torch.float64]


@pytest.mark.parametrize("with_initial", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.core
def test_dense_scan_matches_reference(with_initial):
    """The four pieces as dense einsums (scalar decay) equal the definition in float64, with grouped heads and a
    length that is not a multiple of the chunk (zero-padded)."""
    B, L, G, H, N, P, C = 2, 37, 2, 4, 8, 6, 16
    inputs = make_inputs(B, L, G, H, N, P, with_initial=with_initial)
    inputs = [None if x is None else x.detach().double() for x in inputs]
    y_ref, final_ref = scan_reference(*inputs)
    y, final = dense_scan(*inputs, chunk_size=C)
    assert y.shape == y_ref.shape and final.shape == final_ref.shape
    assert relative_error(y, y_ref) < 1e-10 and relative_error(final, final_ref) < 1e-10


CASES = [
    # B, L, G, H, N,   P,  C,  initial, contiguous
    (2, 37, 1, 2, 16, 16, 16, True, True),    # L not a multiple of the chunk
    (1, 70, 2, 4, 20, 24, 32, True, False),   # batch 1, grouped heads, N and P not powers of two, sliced inputs
    (2, 5, 1, 1, 16, 16, 16, False, True),    # shorter than one chunk, zero initial state
    (3, 1, 1, 2, 16, 32, 16, True, True),     # L = 1
    (1, 48, 3, 3, 32, 16, 16, True, True),    # G = H, an exact number of chunks
    (1, 20, 1, 2, 128, 128, 16, True, True),  # the widest heads: several P and N tiles per program
]

# A decay per key channel. The triton kernels cut chunks into sub-chunks of 16 rows, so chunks of 32 and 64 are what
# exercise the products between sub-chunks; the torch path picks its sub-chunks from the decays (make_inputs' reach
# -2 per step: sub-chunks of 8), and takes the recurrence itself for P <= scan_kernels.RECURRENT_MAX_P.
PER_CHANNEL_CASES = [
    # B, L, G, H, N,   P,  C,  initial, contiguous
    (2, 37, 1, 2, 16, 16, 16, True, True),    # L not a multiple of the chunk
    (1, 40, 2, 4, 20, 24, 32, True, False),   # batch 1, grouped heads, N and P not powers of two, sliced inputs
    (2, 5, 1, 1, 16, 16, 16, False, True),    # shorter than one chunk, zero initial state
    (1, 50, 1, 2, 16, 1, 64, True, True),     # Mamba-1's heads (P = 1, G = 1), four sub-chunks in a chunk
]
CASE_IDS = lambda c: "B{}-L{}-G{}-H{}-N{}-P{}-C{}-init{}-contig{}".format(*c)  # noqa: E731


def check_against_reference(backend, case, per_channel):
    """Outputs, final state and every gradient of chunked_scan against scan_reference, in float32."""
    B, L, G, H, N, P, C, with_initial, contiguous = case
    inputs = make_inputs(B, L, G, H, N, P, with_initial=with_initial, contiguous=contiguous, per_channel=per_channel)
    expected = outputs_and_grads(scan_reference, inputs)
    got = outputs_and_grads(chunked_scan, inputs, chunk_size=C, backend=backend)
    names = ["y", "final_state", "dq", "dk", "dv", "dlog_decay", "dinitial_state"]
    for name, x, ref in zip(names, got, expected):
        assert x.shape == ref.shape and x.dtype == ref.dtype, name
        assert relative_error(x, ref) < TOLERANCE[torch.float32], name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.core
def test_matches_reference_float32(backend, case):
    require_backend(backend)
    check_against_reference(backend, case, per_channel=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", PER_CHANNEL_CASES, ids=CASE_IDS)
@pytest.mark.core
def test_per_channel_matches_reference_float32(backend, case):
    require_backend(backend)
    check_against_reference(backend, case, per_channel=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [(2, 50, 1, 2, 32, 16, 16, False), (1, 23, 2, 4, 16, 32, 16, False),
                                  (1, 40, 1, 2, 16, 16, 32, True)], ids=str)
def test_matches_reference_low_precision(backend, dtype, case):
    require_backend(backend)
    B, L, G, H, N, P, C, per_channel = case
    inputs = make_inputs(B, L, G, H, N, P, dtype=dtype, per_channel=per_channel)
    expected = outputs_and_grads(scan_reference, inputs)
    got = outputs_and_grads(chunked_scan, inputs, chunk_size=C, backend=backend)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    for x, ref in zip(got, expected):
        assert relative_error(x, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("P", [16, 1], ids=["chunked", "recurrent"])
@pytest.mark.parametrize("decay_scale", [0.01, 2.0, 1e3], ids=["one-sub-chunk", "sub-chunks-of-8", "step-by-step"])
def test_per_channel_torch_float64_is_exact(P, decay_scale):
    """In float64 the torch path must equal the definition to float64 roundoff, whatever sub-chunks the decays lead
    it to (mild decays: one per chunk; -2 per step: sub-chunks of 8; -1e3: single positions) and for the recurrence
    (P = 1), with grouped heads: a wrong factor or a missed pair shows as an O(1) error, not 1e-12."""
    import scan_kernels as kernels

    B, L, G, H, N, C = 2, 45, 2, 4, 8, 16
    inputs = make_inputs(B, L, G, H, N, P, per_channel=True)
    inputs[3] = -torch.rand(B, L, H, N) * decay_scale
    inputs = [x.detach().double().requires_grad_() for x in inputs]
    expected = outputs_and_grads(scan_reference, inputs)
    got = outputs_and_grads(chunked_scan, inputs, chunk_size=C, backend="torch")
    for x, ref in zip(got, expected):
        assert x.dtype == torch.float64 and relative_error(x, ref) < TOLERANCE[torch.float64]
    expected_sub_chunk = {0.01: C, 2.0: 8, 1e3: 1}[decay_scale]
    assert set(kernels._sub_chunk_sizes(inputs[3], C)) == {expected_sub_chunk}


SPLITS = [("torch", False, s) for s in (1, 7, 16, 30, 44)] + [("triton", False, s) for s in (1, 16, 44)] + \
         [("torch", True, s) for s in (1, 7, 30)] + [("triton", True, 30)]


@pytest.mark.parametrize("backend,per_channel,split", SPLITS)
@pytest.mark.core
def test_split_equals_whole(backend, per_channel, split):
    """Reading [0:L] at once equals reading [0:a], then [a:L] from the handed-over state; gradients too, so a
    gradient arriving on the first piece's final state flows back into the first piece's inputs."""
    require_backend(backend)
    q, k, v, log_decay, initial = make_inputs(2, 45, 1, 2, 16, 16, per_channel=per_channel)
    inputs = [q, k, v, log_decay, initial]
    C = 32 if per_channel else 16  # per channel: two sub-chunks per chunk in triton

    def whole(*xs):
        return chunked_scan(*xs, chunk_size=C, backend=backend)

    def in_two(q, k, v, log_decay, initial):
        y1, state = chunked_scan(q[:, :split], k[:, :split], v[:, :split], log_decay[:, :split], initial,
                                 chunk_size=C, backend=backend)
        y2, final = chunked_scan(q[:, split:], k[:, split:], v[:, split:], log_decay[:, split:], state,
                                 chunk_size=C, backend=backend)
        return torch.cat([y1, y2], dim=1), final

    for x, ref in zip(outputs_and_grads(in_two, inputs), outputs_and_grads(whole, inputs)):
        assert relative_error(x, ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar", "per-channel"])
def test_one_token_at_a_time(backend, per_channel):
    require_backend(backend)
    q, k, v, log_decay, initial = make_inputs(1, 9, 2, 4, 16, 16, per_channel=per_channel)
    with torch.no_grad():
        y_whole, final_whole = chunked_scan(q, k, v, log_decay, initial, chunk_size=16, backend=backend)
        state, pieces = initial, []
        for t in range(9):
            y_t, state = chunked_scan(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], log_decay[:, t:t + 1], state,
                                      chunk_size=16, backend=backend)
            pieces.append(y_t)
    assert relative_error(torch.cat(pieces, dim=1), y_whole) < TOLERANCE[torch.float32]
    assert relative_error(state, final_whole) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar", "per-channel"])
@pytest.mark.core
def test_very_negative_decay_is_finite_and_exact(backend, per_channel):
    """log_decay down to -1e3 (exp underflows to exactly 0) must neither overflow nor produce nan. Per channel with
    chunks of 64 (four triton sub-chunks), some channels at -1e3 or -300 and their neighbours mild, so that products
    factored through a position in between would overflow."""
    require_backend(backend)
    B, L, chunk = (2, 100, 16) if not per_channel else (1, 100, 64)
    q, k, v, log_decay, initial = make_inputs(B, L, 1, 2, 16, 16, per_channel=per_channel)
    with torch.no_grad():
        log_decay[:, ::7] = -1e3
        log_decay[:, 50:60, ..., ::2] = -300.0
    expected = outputs_and_grads(scan_reference, [q, k, v, log_decay, initial])
    got = outputs_and_grads(chunked_scan, [q, k, v, log_decay, initial], chunk_size=chunk, backend=backend)
    # exponents are differences of float32 cumulative sums that reach about -3e3 inside a chunk here (-1e4 in a
    # chunk of 64), so each carries about 3e3 * 6e-8 = 2e-4 absolute error: relative errors up to 2e-4 are the
    # format, not a bug (measured 1.5e-4 for the per-channel triton kernels)
    for x, ref in zip(got, expected):
        assert torch.isfinite(x).all()
        assert relative_error(x, ref) < 2e-4


@pytest.mark.parametrize("backend,per_channel,length", [("torch", False, 65536), ("triton", False, 8192),
                                                        ("torch", True, 16384), ("triton", True, 256)])
def test_long_sequence(backend, per_channel, length):
    """A long sequence stays finite and equal to the definition (the interpreted triton runs are shorter only to
    keep CI fast: the per-channel kernels cost the interpreter about 15 ms per position; the addressing they
    exercise is the same at any length)."""
    require_backend(backend)
    q, k, v, log_decay, initial = make_inputs(1, length, 1, 1, 16, 16, per_channel=per_channel)
    with torch.no_grad():
        log_decay[:, ::97] = -1e3
        y_ref, final_ref = scan_reference(q, k, v, log_decay, initial)
    y, final = chunked_scan(q, k, v, log_decay, initial, backend=backend)
    (y.sum() + final.sum()).backward()
    # float32 accumulation over a long sequence: measured 2e-5, far from the O(1) error of a wrong recurrence
    assert relative_error(y, y_ref) < 1e-4 and relative_error(final, final_ref) < 1e-4
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, log_decay, initial))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar", "per-channel"])
@pytest.mark.core
def test_chunk_longer_than_the_sequence_is_shortened(backend, per_channel, monkeypatch):
    """chunk_size far above L runs with a chunk of L (torch) or the smallest power of two >= 16 covering L (triton),
    not with (C, C) tiles of the size asked for; the results are those of a chunk that fits."""
    require_backend(backend)
    import scan_kernels as kernels

    inputs = make_inputs(1, 20, 1, 2, 16, 16, per_channel=per_channel)
    chunks = []  # the chunk each torch scan runs with, its last argument

    def recording(scan):
        return lambda *args: chunks.append(args[-1]) or scan(*args)

    for name in ("_scan_torch_scalar", "_scan_torch_per_channel"):
        monkeypatch.setattr(kernels, name, recording(getattr(kernels, name)))
    asked = 8192 if backend == "torch" else 128  # triton refuses chunks above 128 whatever L
    got = outputs_and_grads(chunked_scan, inputs, chunk_size=asked, backend=backend)
    expected = outputs_and_grads(chunked_scan, inputs, chunk_size=16, backend=backend)
    for x, ref in zip(got, expected):
        assert relative_error(x, ref) < TOLERANCE[torch.float32]
    if backend == "torch":
        assert chunks[0] == 20
    assert kernels._triton_chunk_size(128, 20) == 32 and kernels._triton_chunk_size(64, 5000) == 64
    assert kernels._triton_chunk_size(128, 3) == 16


def test_auto_uses_torch_on_cpu():
    inputs = make_inputs(1, 20, 1, 2, 16, 16)
    y_auto, s_auto = chunked_scan(*inputs, backend="auto")
    y_torch, s_torch = chunked_scan(*inputs, backend="torch")
    assert torch.equal(y_auto, y_torch) and torch.equal(s_auto, s_torch)


@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar", "per-channel"])
def test_state_is_float32_and_output_keeps_dtype(per_channel):
    inputs = make_inputs(1, 10, 1, 2, 16, 16, dtype=torch.bfloat16, per_channel=per_channel)
    y, final = chunked_scan(*inputs, backend="torch")
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32


@pytest.mark.parametrize("change,message", [
    (lambda x: x.__setitem__(1, x[1][..., :8]), "q and k must both be"),
    (lambda x: x.__setitem__(2, x[2][:, :, :3]), "multiple of the number of q/k groups"),
    (lambda x: x.__setitem__(3, x[3][:, :-1]), "log_decay must be"),
    (lambda x: x.__setitem__(3, x[3][..., None].expand(-1, -1, -1, 15)), "log_decay must be"),
    (lambda x: x.__setitem__(4, x[4][:, :1]), "initial_state must be"),
])
def test_bad_shapes_raise_clear_errors(change, message):
    inputs = make_inputs(1, 10, 2, 4, 16, 16)
    change(inputs)
    with pytest.raises(ValueError, match=message):
        chunked_scan(*inputs)


@pytest.mark.parametrize("N,P,chunk", [(192, 16, 16), (16, 256, 16), (16, 16, 256)])
def test_triton_refuses_sizes_its_tiles_do_not_cover(N, P, chunk):
    """P and N are single tiles of at most 128 columns: wider heads must be refused, never silently truncated."""
    require_backend("triton")
    inputs = make_inputs(1, 8, 1, 1, N, P)
    with pytest.raises(ValueError, match="P, N <= 128"):
        chunked_scan(*inputs, chunk_size=chunk, backend="triton")


def test_triton_refuses_tiles_beyond_the_gpus_shared_memory(monkeypatch):
    """On a GPU with little shared memory, explicit triton says why and what to do, and auto would not pick it."""
    require_backend("triton")
    import scan_kernels as kernels

    q, k, v, log_decay, initial = make_inputs(1, 8, 1, 1, 128, 128)
    needed_fp32 = kernels.triton_shared_memory(128, 128, 64, element_size=4)
    needed_bf16 = kernels.triton_shared_memory(128, 128, 64, element_size=2)
    assert needed_bf16 < needed_fp32
    monkeypatch.setattr(kernels, "_shared_memory_limit", lambda device: needed_bf16)  # fits bfloat16 only
    assert kernels._triton_refusal(q.bfloat16(), k.bfloat16(), v.bfloat16(), 64) is None
    with pytest.raises(ValueError, match=r"KiB of shared memory .* float32; this GPU has .* bfloat16"):
        chunked_scan(q, k, v, log_decay, initial, chunk_size=64, backend="triton")
    # mixed dtypes compute in float32, so they need the float32 tiles
    assert "shared memory" in kernels._triton_refusal(q.bfloat16(), k.bfloat16(), v, 64)


def test_bad_options_raise_clear_errors():
    inputs = make_inputs(1, 10, 1, 2, 16, 16)
    with pytest.raises(ValueError, match="backend must be one of"):
        chunked_scan(*inputs, backend="cuda")
    if HAS_TRITON:
        with pytest.raises(ValueError, match="power of two"):
            chunked_scan(*inputs, chunk_size=24, backend="triton")
