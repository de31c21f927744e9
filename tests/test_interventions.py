"""Tests of interventions.py: each strategy hands over exactly the state it promises."""
import pytest
import torch

from interventions import INITS, FittedNoise, RandomNoise, StatePassing, TBPTT, Zero
from model import LM, ModelConfig, State

pytestmark = pytest.mark.core
VOCAB = 50


@pytest.fixture
def model():
    return LM(ModelConfig(vocab_size=VOCAB, d_model=32, n_layer=2, mixer="mamba2", d_state=16, headdim=16,
                          chunk_size=16))


def final_state_after(model, batch_size, length=20, state=None):
    _, _, final = model(torch.randint(0, VOCAB, (batch_size, length)), state=state)
    return final


def test_zero_starts_from_zero(model):
    assert Zero(model).initial_state(3, "cpu") is None


def test_state_passing_hands_over_the_previous_final_state_detached(model):
    sp = StatePassing(model, ssm_only=False)
    assert sp.initial_state(3, "cpu") is None  # nothing seen yet: the first batch starts from zero
    final = final_state_after(model, 3)
    assert final.ssm[0].requires_grad  # the model's output carries gradient history ...
    sp.observe(final.detach())
    handed = sp.initial_state(3, "cpu")
    for a, b in zip(handed.ssm + handed.conv, final.ssm + final.conv):
        assert torch.equal(a, b) and not a.requires_grad  # ... the handed-over state does not


def test_state_passing_ssm_only_zeroes_the_convolution_state(model):
    sp = StatePassing(model, ssm_only=True)
    final = final_state_after(model, 2).detach()
    sp.observe(final)
    handed = sp.initial_state(2, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(handed.ssm, final.ssm))
    assert all(c.abs().sum() == 0 for c in handed.conv) and all(c.abs().sum() > 0 for c in final.conv)


def test_fitted_noise_statistics_are_those_of_the_observed_states(model):
    fn = FittedNoise(model)
    assert fn.initial_state(2, "cpu") is None  # before any observation: the zero state
    observed = []
    for _ in range(3):
        final = final_state_after(model, 4).detach()
        fn.observe(final)
        observed.append(final)
    for layer, (mean, std) in enumerate(fn.statistics()):
        entries = torch.cat([f.ssm[layer].double().transpose(0, 1).flatten(1) for f in observed], dim=1)  # (H, ...)
        assert torch.allclose(mean, entries.mean(1), rtol=1e-9, atol=1e-12)
        assert torch.allclose(std, entries.std(1, unbiased=False), rtol=1e-6, atol=1e-12)


def test_fitted_noise_samples_follow_the_fit(model):
    fn = FittedNoise(model)
    fn.observe(final_state_after(model, 4).detach())
    sample = fn.initial_state(2000, "cpu")
    for layer, (mean, std) in enumerate(fn.statistics()):
        entries = sample.ssm[layer].transpose(0, 1).flatten(1)  # (H, 2000 * P * N) draws per head
        assert torch.allclose(entries.mean(1).double(), mean, atol=3e-3 * float(std.max()) + 1e-9)
        assert torch.allclose(entries.std(1).double(), std, rtol=1e-2)
    assert all(c.abs().sum() == 0 for c in sample.conv)


def test_random_noise_has_the_requested_std(model):
    state = RandomNoise(model, noise_std=0.37).initial_state(500, "cpu")
    for s in state.ssm:
        assert abs(s.std().item() - 0.37) < 0.01 * 0.37 and abs(s.mean().item()) < 0.005
    assert all(c.abs().sum() == 0 for c in state.conv)


def test_p_zero_zeroes_the_right_fraction(model):
    sp = StatePassing(model, ssm_only=False, p_zero=0.3)
    sp.observe(final_state_after(model, 2000, length=3).detach())
    handed = sp.initial_state(2000, "cpu")
    zero_rows = handed.ssm[0].flatten(1).abs().sum(1) == 0
    assert abs(zero_rows.float().mean().item() - 0.3) < 0.03  # binomial std at n = 2000 is 0.01
    for s, c in zip(handed.ssm, handed.conv):  # a zeroed row is zero in every layer and in the conv state too
        assert (s.flatten(1).abs().sum(1)[zero_rows] == 0).all()
        assert (c.flatten(1).abs().sum(1)[zero_rows] == 0).all()


def test_tbptt_continues_each_row_and_resets_restarted_rows(model):
    tb = TBPTT(model, ssm_only=False)
    final = final_state_after(model, 3).detach()
    tb.observe(final)
    handed = tb.initial_state(3, "cpu", restarted=torch.tensor([False, True, False]))
    assert torch.equal(handed.ssm[1][0], final.ssm[1][0]) and torch.equal(handed.ssm[1][2], final.ssm[1][2])
    assert handed.ssm[1][1].abs().sum() == 0 and handed.conv[0][1].abs().sum() == 0


def test_tbptt_reading_in_windows_equals_reading_the_stream(model):
    """With contiguous windows and the state carried, tbptt reads exactly what one long pass reads."""
    stream = torch.randint(0, VOCAB, (2, 60))
    tb = TBPTT(model, ssm_only=False)
    with torch.no_grad():
        whole, _, _ = model(stream)
        pieces = []
        for start in range(0, 60, 20):
            initial = tb.initial_state(2, "cpu", restarted=torch.tensor([start == 0] * 2))
            logits, _, final = model(stream[:, start:start + 20], state=initial)
            tb.observe(final)
            pieces.append(logits)
    assert torch.allclose(torch.cat(pieces, dim=1), whole, atol=1e-4)


def test_interventions_round_trip_through_state_dict(model):
    values = dict(noise_std=0.1, p_zero=0.5, ssm_only=False)
    for name in ("random_noise", "fitted_noise", "state_passing", "tbptt"):
        options = {k: v for k, v in values.items() if k in INITS[name].options}
        a = INITS[name](model, seed=3, **options)
        a.observe(final_state_after(model, 4).detach())
        a.initial_state(4, "cpu")  # advances the generator
        b = INITS[name](model, seed=99, **options)
        b.load_state_dict(a.state_dict())
        sa, sb = a.initial_state(4, "cpu"), b.initial_state(4, "cpu")
        assert all(torch.equal(x, y) for x, y in zip(sa.ssm, sb.ssm)), name


def test_each_intervention_takes_exactly_its_own_options(model):
    """A class's options are its settings (train.py offers them as flags and gives each class its own): each one
    keeps what it was given, takes the default otherwise, and refuses the options of the others."""
    assert list(INITS) == ["zero", "random_noise", "fitted_noise", "state_passing", "tbptt"]
    assert {name: set(cls.options) for name, cls in INITS.items()} == {
        "zero": set(), "random_noise": {"p_zero", "noise_std"}, "fitted_noise": {"p_zero"},
        "state_passing": {"p_zero", "ssm_only"}, "tbptt": {"p_zero", "ssm_only"}}
    values = dict(noise_std=0.25, p_zero=0.5, ssm_only=True)
    for name, cls in INITS.items():
        options = {k: v for k, v in values.items() if k in cls.options}
        intervention = cls(model, seed=7, **options)
        assert type(intervention) is cls and intervention.seed == 7
        assert all(getattr(intervention, k) == v for k, v in options.items())
        assert all(getattr(cls(model), k) == default for k, (default, _) in cls.options.items())
    with pytest.raises(TypeError, match="noise_std"):
        StatePassing(model, noise_std=0.1)
    with pytest.raises(TypeError, match="p_zero"):
        Zero(model, p_zero=0.5)


def test_gradients_do_not_flow_into_passed_states(model):
    sp = StatePassing(model, ssm_only=False)
    sp.observe(final_state_after(model, 2).detach())
    initial = sp.initial_state(2, "cpu")
    _, loss, _ = model(torch.randint(0, VOCAB, (2, 10)), torch.randint(0, VOCAB, (2, 10)), state=initial)
    loss.backward()
    assert all(s.grad is None for s in initial.ssm)
    assert isinstance(initial, State)
