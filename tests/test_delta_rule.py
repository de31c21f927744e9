"""Tests of delta_rule/scan.py: the step-by-step definition against a recurrence written here from the equations, the
chunked path and the one-token step against the definition (outputs, final states and every gradient), pieces with
the state handed on, gates near 0 and near -1e3, beta at 0 and 1, and deliberate bugs that the comparison catches.

Errors are ||x - ref|| / ||ref||. In float64 the chunked path differs from the loop by float64 roundoff over a few
hundred operations (measured about 1e-15), so 1e-12 separates a wrong formula from rounding; in float32, 1e-5 (sums
of a few hundred products at a unit roundoff of 6e-8, measured about 3e-7). k is L2-normalised and beta in [0, 1] as
in DeltaNet: each transition I - beta k k^T then has norm at most 1, and the state stays bounded.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from delta_rule import chunked_delta_rule, delta_rule_reference, delta_rule_step

REPO = Path(__file__).resolve().parent.parent
F64 = torch.float64


def relative_error(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def make_inputs(B, L, G, H, N, P, dtype=F64, gated=True, decay=(0.0, 1.0), beta=None):
    """q, k (B, L, G, N) with k of unit norm; v (B, L, H, P); beta (B, L, H) uniform in [0, 1] unless given;
    log_decay (B, L, H) uniform in -[decay[0], decay[1]], or None when not gated; initial state (B, H, P, N). All
    leaves that require gradients."""
    q = torch.randn(B, L, G, N, dtype=dtype)
    k = F.normalize(torch.randn(B, L, G, N, dtype=dtype), dim=-1)
    v = torch.randn(B, L, H, P, dtype=dtype)
    beta = torch.rand(B, L, H, dtype=dtype) if beta is None else beta.to(dtype)
    low, high = decay
    log_decay = -(low + (high - low) * torch.rand(B, L, H, dtype=dtype)) if gated else None
    initial = torch.randn(B, H, P, N, dtype=dtype)
    return [t if t is None else t.detach().requires_grad_() for t in (q, k, v, beta, log_decay, initial)]


def recurrence_by_hand(q, k, v, beta, log_decay, initial, bug=None):
    """The gated delta rule head by head and step by step, in float64, in its erase-and-write form:
        S <- alpha_t S;   S <- S - beta_t (S k_t) k_t^T + beta_t v_t k_t^T;   y_t = S q_t
    Written independently of delta_rule_reference (which multiplies by the (N, N) transition). `bug` makes it
    wrong on purpose, to show that the comparisons below would notice:
        "beta dropped"           beta_t = 1 at every step
        "gate reversed"          the gate decays the new write too: S <- alpha_t (S - beta_t (S k_t - v_t) k_t^T)
        "output before update"   y_t = S_{t-1} q_t
    """
    B, L, G, N = q.shape
    H = v.shape[2]
    y = torch.zeros(v.shape, dtype=F64)
    final = torch.zeros(initial.shape, dtype=F64)
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            S = initial[b, h].double()
            for t in range(L):
                q_t, k_t, v_t = q[b, t, g].double(), k[b, t, g].double(), v[b, t, h].double()
                beta_t = 1.0 if bug == "beta dropped" else beta[b, t, h].double()
                alpha_t = 1.0 if log_decay is None else torch.exp(log_decay[b, t, h].double())
                before = S
                if bug != "gate reversed":
                    S = alpha_t * S
                S = S - beta_t * torch.outer(S @ k_t - v_t, k_t)
                if bug == "gate reversed":
                    S = alpha_t * S
                y[b, t, h] = (before if bug == "output before update" else S) @ q_t
            final[b, h] = S
    return y, final


def outputs_and_grads(fn, inputs, **kwargs):
    """y, the final state and the gradients of (y * gy).sum() + (final * gs).sum() for every input given."""
    y, final = fn(*inputs, **kwargs)
    generator = torch.Generator().manual_seed(1)
    gy = torch.randn(y.shape, generator=generator, dtype=F64)
    gs = torch.randn(final.shape, generator=generator, dtype=F64)
    present = [t for t in inputs if t is not None]
    grads = torch.autograd.grad((y.double() * gy).sum() + (final.double() * gs).sum(), present)
    return [y, final, *grads]


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
def test_reference_is_the_recurrence_written_by_hand(gated):
    """The definition itself, against the erase-and-write loop above, with two heads reading each q/k group."""
    q, k, v, beta, log_decay, initial = make_inputs(2, 9, 2, 4, 5, 3, gated=gated)
    y, final = delta_rule_reference(q, k, v, beta, log_decay, initial)
    y_hand, final_hand = recurrence_by_hand(q, k, v, beta, log_decay, initial)
    assert relative_error(y, y_hand) < 1e-12 and relative_error(final, final_hand) < 1e-12


@pytest.mark.parametrize("B, L, G, H, chunk", [(2, 300, 1, 4, 64), (1, 37, 2, 4, 16), (1, 10, 1, 2, 64),
                                               (3, 64, 3, 3, 64)],
                         ids=["long", "batch1-uneven", "chunk-longer-than-L", "one-chunk-own-qk"])
@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
def test_chunked_matches_reference(B, L, G, H, chunk, gated):
    """Outputs, final state and the gradients of q, k, v, beta, log_decay and the initial state, in float64."""
    inputs = make_inputs(B, L, G, H, 8, 6, gated=gated)
    ours = outputs_and_grads(chunked_delta_rule, inputs, chunk_size=chunk)
    reference = outputs_and_grads(delta_rule_reference, inputs)
    errors = [relative_error(a, b) for a, b in zip(ours, reference)]
    assert max(errors) < 1e-12, errors


def test_chunked_float32_matches_reference():
    """The path a model runs, in float32: y in v's dtype, the state in float32, within float32 rounding."""
    inputs = make_inputs(2, 300, 2, 4, 16, 16, dtype=torch.float32)
    y, final = chunked_delta_rule(*inputs)
    y_ref, final_ref = delta_rule_reference(*inputs)
    assert y.dtype == torch.float32 and final.dtype == torch.float32
    assert relative_error(y, y_ref) < 1e-5 and relative_error(final, final_ref) < 1e-5


@pytest.mark.parametrize("decay", [(0.0, 1e-6), (5e2, 1e3)], ids=["near-0", "near-minus-1000"])
def test_extreme_gates_in_float32(decay):
    """A gate that barely decays and one that erases the state at every step: float32 within 1e-5 of the float64
    loop, every gradient finite and close. At -1e3 the memory keeps nothing from the step before, so
    y_t = beta_t (q_t . k_t) v_t: checked directly, as is the state leaving."""
    inputs = make_inputs(2, 200, 1, 2, 16, 8, dtype=torch.float32, decay=decay)
    ours = outputs_and_grads(chunked_delta_rule, inputs)
    reference = outputs_and_grads(delta_rule_reference, inputs)
    assert all(torch.isfinite(x).all() for x in ours)
    errors = [relative_error(a, b) for a, b in zip(ours, reference)]
    assert max(errors) < 1e-5, errors
    if decay[0] > 0:
        q, k, v, beta = (x.detach() for x in inputs[:4])
        forgetful = beta[..., None] * (q * k).sum(-1, keepdim=True) * v  # G = 1: every head reads group 0
        assert relative_error(ours[0], forgetful) < 1e-5
        last = beta[:, -1, :, None, None] * v[:, -1, :, :, None] * k[:, -1, :, None, :]
        assert relative_error(ours[1], last) < 1e-5


def test_beta_zero_and_one():
    """beta exactly 0 and 1, mixed: against the loop; beta = 0 everywhere only decays the initial state (final =
    exp(sum of log_decay) S_0); beta = 1 with a unit k makes the memory return exactly v_t at k_t afterwards."""
    pattern = torch.randint(0, 2, (2, 50, 3)).double()  # 0s and 1s
    inputs = make_inputs(2, 50, 1, 3, 8, 4, beta=pattern)
    errors = [relative_error(a, b) for a, b in zip(outputs_and_grads(chunked_delta_rule, inputs, chunk_size=16),
                                                   outputs_and_grads(delta_rule_reference, inputs))]
    assert max(errors) < 1e-12, errors

    q, k, v, _, log_decay, initial = (x.detach() for x in inputs)
    _, final = chunked_delta_rule(q, k, v, torch.zeros(2, 50, 3, dtype=F64), log_decay, initial, chunk_size=16)
    expected = torch.exp(log_decay.sum(1))[..., None, None] * initial
    assert relative_error(final, expected) < 1e-12

    _, final = chunked_delta_rule(q, k, v, torch.ones(2, 50, 3, dtype=F64), log_decay, initial, chunk_size=16)
    recalled = final @ k[:, -1, :, :, None]  # S_{L-1} k_{L-1}: (B, H, P, 1), the one group read by every head
    assert relative_error(recalled[..., 0], v[:, -1]) < 1e-12


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
def test_pieces_with_the_state_handed_on_equal_the_whole(gated):
    """150 tokens read whole, and read as pieces of 37, 64 and 49 (uneven against the chunk of 32), each starting
    from the state the previous one left."""
    q, k, v, beta, log_decay, initial = (x if x is None else x.detach() for x in make_inputs(2, 150, 1, 2, 8, 8,
                                                                                              gated=gated))
    y_whole, final_whole = chunked_delta_rule(q, k, v, beta, log_decay, initial, chunk_size=32)
    state, pieces = initial, []
    for piece in torch.arange(150).split([37, 64, 49]):
        y, state = chunked_delta_rule(q[:, piece], k[:, piece], v[:, piece], beta[:, piece],
                                      None if log_decay is None else log_decay[:, piece], state, chunk_size=32)
        pieces.append(y)
    assert relative_error(torch.cat(pieces, dim=1), y_whole) < 1e-12
    assert relative_error(state, final_whole) < 1e-12


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
def test_step_matches_reference(gated):
    """delta_rule_step token by token equals the loop, two heads per q/k group; the caller's state is unchanged."""
    q, k, v, beta, log_decay, initial = (x if x is None else x.detach() for x in make_inputs(2, 20, 2, 4, 8, 5,
                                                                                              gated=gated))
    y_ref, final_ref = delta_rule_reference(q, k, v, beta, log_decay, initial)
    state, outputs = initial, []
    for t in range(20):
        before = state.clone()
        y, new_state = delta_rule_step(q[:, t], k[:, t], v[:, t], beta[:, t],
                                       None if log_decay is None else log_decay[:, t], state)
        assert torch.equal(state, before)
        state = new_state
        outputs.append(y)
    assert relative_error(torch.stack(outputs, dim=1), y_ref) < 1e-12
    assert relative_error(state, final_ref) < 1e-12


def test_gradcheck():
    """autograd's finite-difference check of every input, the initial state included, on a length (5) that is
    not a multiple of the chunk (2)."""
    inputs = make_inputs(1, 5, 1, 2, 3, 2, decay=(0.1, 1.0))
    assert torch.autograd.gradcheck(lambda *x: chunked_delta_rule(*x, chunk_size=2), inputs)


@pytest.mark.parametrize("bug", ["beta dropped", "gate reversed", "output before update"])
def test_deliberate_bugs_are_caught(bug):
    """The comparison has teeth: the loop made wrong on purpose disagrees with the chunked path by far more than
    the tolerance, while the loop as written agrees within it."""
    inputs = [x.detach() for x in make_inputs(1, 40, 1, 2, 8, 4, decay=(0.05, 0.5))]
    y, final = chunked_delta_rule(*inputs, chunk_size=16)
    y_right, final_right = recurrence_by_hand(*inputs)
    y_wrong, final_wrong = recurrence_by_hand(*inputs, bug=bug)
    assert relative_error(y, y_right) < 1e-12 and relative_error(final, final_right) < 1e-12
    assert relative_error(y, y_wrong) > 1e-2


@pytest.mark.parametrize("change", ["beta", "per-channel gate", "chunk"])
def test_bad_inputs_are_refused(change):
    q, k, v, beta, log_decay, initial = (x.detach() for x in make_inputs(1, 8, 1, 2, 4, 4))
    kwargs = {}
    if change == "beta":
        beta = beta[:, :, :1]
    elif change == "per-channel gate":
        log_decay = log_decay[..., None].expand(-1, -1, -1, 4)
    else:
        kwargs["chunk_size"] = 0
    with pytest.raises(ValueError):
        chunked_delta_rule(q, k, v, beta, log_decay, initial, **kwargs)


def test_default_commands_do_not_import_the_delta_rule():
    """train.py and eval.py read without this folder: importing them loads nothing of delta_rule/."""
    code = "import sys, train, eval; sys.exit(any(m.startswith('delta_rule') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0

