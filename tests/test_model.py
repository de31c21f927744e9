"""Tests of model.py: the state makes whole, piecewise and token-by-token reading identical, and the model trains.

Outputs are float32 logits of magnitude ~1-10; the three reading orders differ only by float32 summation order
(measured below 2e-6), so 1e-4 absolute catches any real difference (a dropped or doubled token moves logits by
~1e-1).
"""
import sys

import pytest
import torch
import torch.nn.functional as F

from scan_kernels import HAS_TRITON
from model import LM, MIXERS, GatedLinearAttention, ModelConfig, State

VOCAB = 97


def small_config(mixer, backend="torch", **overrides):
    kwargs = dict(vocab_size=VOCAB, d_model=32, n_layer=2, mixer=mixer, d_state=16, headdim=16, chunk_size=16,
                  n_heads=2, backend=backend)
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def require_backend(backend):
    if backend == "triton" and not HAS_TRITON:
        if sys.platform.startswith("linux"):
            pytest.fail("triton is not installed; run pip install -r requirements.txt")
        pytest.skip("triton has no wheel for this platform")


CONFIGS = [("mamba2", {}), ("mamba2", {"ngroups": 2, "mlp": True}), ("gla", {}), ("gla", {"gate": "head"}),
           ("gla", {"gate": "none"}), ("mamba1", {})]


# Mamba-1 runs on the torch backend only here: its 64 one-channel heads take minutes in triton's interpreter, and
# tests/test_scan_kernels.py checks the per-channel kernels at P = 1 on smaller shapes.
@pytest.mark.parametrize("backend,mixer,overrides",
                         [(b, m, o) for b in ("torch", "triton") for m, o in CONFIGS if (b, m) != ("triton", "mamba1")],
                         ids=lambda x: str(x))
@pytest.mark.core
def test_whole_equals_pieces_equals_steps(backend, mixer, overrides):
    require_backend(backend)
    model = LM(small_config(mixer, backend, **overrides)).eval()
    idx = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        whole, _, final = model(idx)
        # uneven pieces: shorter than the convolution width (1 and 2 tokens), across chunk boundaries
        state, pieces = None, []
        for start, end in [(0, 1), (1, 3), (3, 20), (20, 21), (21, 40)]:
            logits, _, state = model(idx[:, start:end], state=state)
            pieces.append(logits)
        steps, step_state = [], model.init_state(2)
        for t in range(idx.shape[1]):
            logits, step_state = model.step(idx[:, t], step_state)
            steps.append(logits)
    assert torch.allclose(torch.cat(pieces, dim=1), whole, atol=1e-4)
    assert torch.allclose(torch.stack(steps, dim=1), whole, atol=1e-4)
    for a, b, c in zip(final.ssm, state.ssm, step_state.ssm):
        assert torch.allclose(a, b, atol=1e-4) and torch.allclose(a, c, atol=1e-4)


@pytest.mark.parametrize("mixer", ["mamba2", "gla", "mamba1"])
@pytest.mark.core
def test_gradients_reach_every_parameter(mixer):
    model = LM(small_config(mixer, mlp=True))
    idx = torch.randint(0, VOCAB, (2, 24))
    _, loss, _ = model(idx[:, :-1], targets=idx[:, 1:], state=model.init_state(2))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("mixer", ["mamba2", "gla", "mamba1"])
@pytest.mark.core
def test_initial_state_changes_outputs(mixer):
    model = LM(small_config(mixer)).eval()
    idx = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        from_zero, _, _ = model(idx)
        _, _, after_prefix = model(torch.randint(0, VOCAB, (2, 30)))
        from_prefix, _, _ = model(idx, state=after_prefix)
        explicit_zero, _, _ = model(idx, state=model.init_state(2))
    assert (from_zero - from_prefix).abs().max() > 1e-2
    assert torch.allclose(from_zero, explicit_zero, atol=1e-5)


@pytest.mark.parametrize("mixer", ["mamba2", "gla", "mamba1"])
def test_bf16_autocast_on_cpu(mixer):
    model = LM(small_config(mixer))
    idx = torch.randint(0, VOCAB, (2, 33))
    _, loss32, _ = model(idx[:, :-1], targets=idx[:, 1:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss16, state = model(idx[:, :-1], targets=idx[:, 1:])
    loss16.backward()
    assert logits.dtype == torch.bfloat16 and state.ssm[0].dtype == torch.float32
    # bfloat16 keeps 8 bits of mantissa: the loss (about log(97) = 4.6 at init) moves by well under 1%
    assert abs(loss16.item() - loss32.item()) < 0.02 * loss32.item()


def expected_parameters(cfg):
    """The parameter count written out from the architecture, independently of the module code."""
    D, V = cfg.d_model, cfg.padded_vocab_size
    if cfg.mixer == "mamba2":
        d_inner = cfg.expand * D
        H, GN = d_inner // cfg.headdim, cfg.ngroups * cfg.d_state
        conv_dim = d_inner + 2 * GN
        mixer = (D * (2 * d_inner + 2 * GN + H)  # in_proj: z, x, B, C, dt
                 + conv_dim * cfg.d_conv + conv_dim  # depthwise conv weight and bias
                 + 3 * H  # dt_bias, A_log, D
                 + d_inner  # gated norm
                 + d_inner * D)  # out_proj
    elif cfg.mixer == "mamba1":
        E, N, R = cfg.expand * D, cfg.d_state, -(-D // 16)  # dt_rank = ceil(D / 16)
        mixer = (D * 2 * E  # in_proj: x, z
                 + E * cfg.d_conv + E  # depthwise conv weight and bias
                 + E * (R + 2 * N)  # x_proj: dt, B, C
                 + R * E + E  # dt_proj and its bias
                 + E * N + E  # A_log, D
                 + E * D)  # out_proj
    else:
        key, value = int(cfg.expand_k * D), int(cfg.expand_v * D)
        gate = {"head": D * cfg.n_heads + cfg.n_heads, "channel": D * 16 + 16 * key + key, "none": 0}[cfg.gate]
        mixer = 2 * D * key + D * value + gate + D * value + value // cfg.n_heads + value * D
    hidden = (int(8 * D / 3) + 127) // 128 * 128
    mlp = (D + 3 * D * hidden) if cfg.mlp else 0  # norm2, fc1 (2 * hidden outputs), fc2
    return V * D + cfg.n_layer * (D + mixer + mlp) + D  # tied embedding, blocks, final norm


@pytest.mark.parametrize("kwargs", [dict(d_model=768, n_layer=24, mixer="mamba2"),
                                    dict(d_model=768, n_layer=12, mixer="gla", n_heads=8),
                                    dict(d_model=64, n_layer=3, mixer="mamba2", d_state=32, ngroups=2),
                                    dict(d_model=64, n_layer=2, mixer="gla", gate="none", n_heads=4),
                                    dict(d_model=64, n_layer=2, mixer="gla", gate="head", n_heads=4),
                                    dict(d_model=96, n_layer=2, mixer="mamba1", d_state=16)])
def test_parameter_counts(kwargs):
    cfg = ModelConfig(vocab_size=50257, **kwargs)
    assert LM(cfg).num_parameters() == expected_parameters(cfg)


def test_mamba2_130m_has_the_official_size():
    """train.py's paper preset is the smallest official Mamba-2 model, called 130M; with the GPT-2 vocabulary it has
    129.0M parameters."""
    import dataclasses

    import runs

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    preset = {k: v for k, v in runs.PRESETS["paper"].items() if k in fields}
    assert LM(ModelConfig(vocab_size=50257, **preset)).num_parameters() == 129_001_920


def test_mamba2_initialisation_follows_the_official_ranges():
    mixer = LM(ModelConfig(vocab_size=VOCAB, d_model=256, n_layer=1, mixer="mamba2")).backbone.layers[0].mixer
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    A = torch.exp(mixer.A_log)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
    assert A.min() >= 1.0 and A.max() <= 16.0
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))


def test_vocabulary_is_padded_but_logits_are_not():
    model = LM(small_config("mamba2"))
    assert model.backbone.embedding.weight.shape[0] == 128
    logits, _, _ = model(torch.randint(0, VOCAB, (1, 5)))
    assert logits.shape == (1, 5, VOCAB)


def test_state_operations():
    model = LM(small_config("mamba2"))
    with torch.no_grad():
        _, _, state = model(torch.randint(0, VOCAB, (3, 12)))
    zeroed = state.zero_rows(torch.tensor([False, True, False]))
    assert zeroed.ssm[0][1].abs().sum() == 0 and torch.equal(zeroed.ssm[0][0], state.ssm[0][0])
    assert state.ssm[0][1].abs().sum() > 0  # the original is untouched
    restored = State(**vars(state))  # what a checkpoint holds of a State: its lists of tensors
    assert all(torch.equal(a, b) for a, b in zip(restored.ssm + restored.conv, state.ssm + state.conv))
    detached = state.detach()
    assert all(torch.equal(a, b) for a, b in zip(detached.ssm, state.ssm))


def test_convolution_state_does_not_hold_the_whole_input():
    """The state must own only its W - 1 columns; a view would keep the sequence's activations alive."""
    model = LM(small_config("mamba2"))
    with torch.no_grad():
        _, _, state = model(torch.randint(0, VOCAB, (2, 300)))
    for conv in state.conv:
        assert conv.untyped_storage().nbytes() == conv.numel() * conv.element_size()


@pytest.mark.parametrize("mixer", ["gla", "mamba2"])
@pytest.mark.core
def test_greedy_decoding_through_step_matches_full_forward(mixer):
    model = LM(small_config(mixer)).eval()
    prompt = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        logits, _, state = model(prompt)
        out = torch.cat([prompt, model.greedy(logits[:, -1], state, 5)], dim=1)
        assert out.shape == (2, 11)
        for t in range(6, 11):  # each token the argmax after reading everything before it from the zero state
            logits, _, _ = model(out[:, :t])
            assert torch.equal(logits[:, -1].argmax(-1), out[:, t])


@pytest.mark.parametrize("kwargs,message", [
    (dict(mixer="rnn"), "unknown mixer"),
    (dict(mixer="gla", gate="sometimes"), "unknown gate"),
    (dict(mixer="mamba2", headdim=48), "multiple of headdim"),
    (dict(mixer="gla", n_heads=3), "multiple of n_heads"),
    (dict(mixer="mamba2", backend="cuda"), "unknown backend"),
    (dict(mixer="mamba2", headdim=0), "headdim must be positive; got 0"),
    (dict(mixer="gla", n_heads=0), "n_heads must be positive; got 0"),
    (dict(mixer="mamba2", dt_min=-1.0), "dt_min must be positive"),
    (dict(mixer="mamba2", gate_temperature=float("nan")), "gate_temperature must be positive"),
    (dict(mixer="mamba2", dt_min=0.5, dt_max=0.1), "dt_min = 0.5 is above dt_max = 0.1"),
])
def test_bad_configs_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(vocab_size=VOCAB, d_model=32, n_layer=1, **kwargs)


def test_state_batch_mismatch_is_a_clear_error():
    model = LM(small_config("mamba2"))
    with pytest.raises(ValueError, match="state holds 3 rows"):
        model(torch.randint(0, VOCAB, (2, 4)), state=model.init_state(3))


def test_a_mixer_is_added_by_one_entry_in_mixers(monkeypatch):
    """A registered class is all a new mixer needs: the config checks it, Block builds it, and the projections it
    names are scaled at initialisation."""

    class ScaledGLA(GatedLinearAttention):
        residual_projections = ("o_proj", "g_proj")

    monkeypatch.setitem(MIXERS, "scaled_gla", ScaledGLA)
    cfg = small_config("scaled_gla")
    assert cfg.mlp and cfg.head_sizes() == small_config("gla").head_sizes()
    with pytest.raises(ValueError, match="multiple of n_heads"):
        small_config("scaled_gla", n_heads=3)
    torch.manual_seed(0)
    scaled = LM(cfg).backbone.layers[0].mixer.g_proj.weight
    torch.manual_seed(0)
    plain = LM(small_config("gla")).backbone.layers[0].mixer.g_proj.weight
    # kaiming_uniform's bound is 1/sqrt(fan_in); the scaled one is divided by sqrt(2 writes * 2 layers) = 2
    assert scaled.abs().max() <= 32 ** -0.5 / 2 + 1e-6 < plain.abs().max()
    logits, _, state = LM(cfg)(torch.randint(0, VOCAB, (2, 20)))
    assert logits.shape == (2, 20, VOCAB) and len(state.ssm) == 2


def test_recomputed_blocks_give_the_same_loss_gradients_and_state():
    """recompute=True keeps only each block's input and runs the block again in the backward pass: the same numbers
    (float32, identical operations), from a non-zero initial state too."""
    torch.manual_seed(0)
    model = LM(ModelConfig(vocab_size=50, d_model=32, n_layer=3, mixer="mamba2", d_state=16, headdim=16,
                           chunk_size=16))
    idx = torch.randint(0, 50, (2, 37))
    _, _, initial = model(idx[:, :5])
    initial = initial.detach()
    results = []
    for recompute in (False, True):
        model.cfg.recompute = recompute
        model.zero_grad()
        _, loss, final = model(idx, idx, initial)
        loss.backward()
        results.append((loss.item(), final.ssm[-1].detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, state_a, grads_a), (loss_b, state_b, grads_b) = results
    assert loss_a == loss_b and torch.equal(state_a, state_b)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-8) for a, b in zip(grads_a, grads_b))


def test_a_checkpoint_whose_config_claims_more_layers_than_its_weights_is_refused_at_once(tmp_path):
    """eval.py reads checkpoints it did not write: a 2-layer checkpoint whose config says a million layers is
    refused by comparing the config with the saved tensors, before any model of that size is built."""
    import time

    import runs

    runs.save_checkpoint(tmp_path / "run", runs.model_payload(LM(small_config("mamba2")), args={"seq_len": 16}))
    ckpt = runs.load_checkpoint(tmp_path / "run")
    ckpt["model_config"]["n_layer"] = 10 ** 6
    started = time.perf_counter()
    with pytest.raises(runs.CheckpointError, match="n_layer"):
        runs.load_model(ckpt)
    assert time.perf_counter() - started < 5
    ckpt["model_config"]["n_layer"] = 2
    ckpt["model"]["backbone.layers.0.mixer.D"] = torch.zeros(5)  # a tensor of the wrong shape
    with pytest.raises(runs.CheckpointError, match="backbone.layers.0.mixer.D"):
        runs.load_model(ckpt)


# ----------------------------------------------------------------------------------------------------------------
# GLA with its per-channel gate, and Mamba-1, against float64 recurrences written from their papers' equations
# ----------------------------------------------------------------------------------------------------------------

def rms(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def reference_gla(w, x, temperature=16.0, reverse_gate=False):
    """GLA (Yang et al. 2024): S_t = S_{t-1} diag(alpha_t) + v_t k_t^T, y_t = S_t q_t, log alpha_t =
    logsigmoid(x W1 W2 + b) / 16, then a per-head RMSNorm times silu(x W_g).  w: the mixer's float64 tensors;
    x (B, L, D) float64.  reverse_gate: the gate's channels in reverse order (a bug the comparison must catch)."""
    B, L, _ = x.shape
    H = 2
    q = (x @ w["q_proj.weight"].T).unflatten(-1, (H, -1))
    N = q.shape[-1]
    q = q * N ** -0.5
    k = (x @ w["k_proj.weight"].T).unflatten(-1, (H, N))
    v = (x @ w["v_proj.weight"].T).unflatten(-1, (H, -1))
    gate = F.logsigmoid(x @ w["gk_proj.0.weight"].T @ w["gk_proj.1.weight"].T + w["gk_proj.1.bias"]) / temperature
    gate = gate.unflatten(-1, (H, N))
    if reverse_gate:
        gate = gate.flip(-1)
    S = torch.zeros(B, H, v.shape[-1], N, dtype=x.dtype)
    ys = []
    for t in range(L):
        S = S * torch.exp(gate[:, t])[:, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :]
        ys.append(S @ q[:, t, :, :, None])
    y = rms(torch.stack(ys, 1)[..., 0], w["g_norm.weight"]) * F.silu(x @ w["g_proj.weight"].T).unflatten(-1, (H, -1))
    return y.flatten(-2) @ w["o_proj.weight"].T


def reference_mamba1(w, u, drop_D=False):
    """Mamba-1's selective scan (Gu & Dao 2023), channel by channel: h_t[d] = exp(dt_t[d] A[d]) h_{t-1}[d] +
    dt_t[d] B_t x_t[d], y_t[d] = C_t . h_t[d] + D[d] x_t[d], out = out_proj(y * silu(z)).  w: the mixer's float64
    tensors; u (B, L, D) float64.  drop_D: without the skip connection (a bug the comparison must catch)."""
    B, L, _ = u.shape
    x, z = (u @ w["in_proj.weight"].T).chunk(2, dim=-1)
    W = w["conv1d.weight"].shape[-1]
    padded = F.pad(x, (0, 0, W - 1, 0))  # causal: W - 1 zeros before the first token
    x = F.silu(w["conv1d.bias"] + sum(w["conv1d.weight"][:, 0, j] * padded[:, j:j + L] for j in range(W)))
    N = w["A_log"].shape[1]
    dt, Bm, Cm = (x @ w["x_proj.weight"].T).split([w["dt_proj.weight"].shape[1], N, N], dim=-1)
    dt = F.softplus(dt @ w["dt_proj.weight"].T + w["dt_proj.bias"])  # (B, L, E)
    A = -torch.exp(w["A_log"])  # (E, N)
    h = torch.zeros(B, x.shape[-1], N, dtype=u.dtype)
    ys = []
    for t in range(L):
        h = torch.exp(dt[:, t, :, None] * A) * h + dt[:, t, :, None] * Bm[:, t, None, :] * x[:, t, :, None]
        ys.append((h * Cm[:, t, None, :]).sum(-1) + (0 if drop_D else w["D"] * x[:, t]))
    return (torch.stack(ys, 1) * F.silu(z)) @ w["out_proj.weight"].T


def mixer_weights(layer):
    """A mixer's tensors in float64, by their (official) names."""
    return {name: p.detach().double() for name, p in layer.named_parameters()}


def randomise(model):
    """Weights far from their initialisation, so that every gate and skip connection shows in the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.5))
    return model


@pytest.mark.parametrize("mixer,reference,bug", [("gla", reference_gla, {"reverse_gate": True}),
                                                 ("mamba1", reference_mamba1, {"drop_D": True})])
@pytest.mark.core
def test_the_mixer_is_the_recurrence_of_its_paper(mixer, reference, bug):
    """float32 outputs of magnitude ~1 against a float64 step-by-step recurrence: 1e-4 relative covers float32
    summation (measured ~1e-6); the comparison catches a reversed gate or a dropped D (off by ~1e-1 and more)."""
    torch.manual_seed(0)
    model = randomise(LM(ModelConfig(vocab_size=VOCAB, d_model=32, n_layer=1, mixer=mixer, n_heads=2, d_state=8,
                                     chunk_size=8, backend="torch")))
    layer = model.backbone.layers[0].mixer
    x = torch.randn(2, 29, 32)  # 29: not a multiple of the chunk
    with torch.no_grad():
        out, _, _ = layer(x)
    expected = reference(mixer_weights(layer), x.double())
    scale = expected.abs().max()
    assert scale > 0.1 and (out.double() - expected).abs().max() / scale < 1e-4
    wrong = reference(mixer_weights(layer), x.double(), **bug)
    assert (wrong - expected).abs().max() / scale > 1e-2


def test_mamba1_keeps_a_state_per_channel_and_its_official_initialisation():
    cfg = ModelConfig(vocab_size=VOCAB, d_model=48, n_layer=1, mixer="mamba1", d_state=16)
    layer = LM(cfg).backbone.layers[0].mixer
    assert layer.dt_rank == 3 and tuple(layer.A_log.shape) == (96, 16)
    assert torch.allclose(torch.exp(layer.A_log[5]), torch.arange(1, 17, dtype=torch.float32))  # S4D-real
    dt = F.softplus(layer.dt_proj.bias)
    assert dt.min() >= cfg.dt_init_floor and dt.max() <= cfg.dt_max * 1.0001  # the bias was not zeroed
    state = LM(cfg).init_state(3)
    assert tuple(state.ssm[0].shape) == (3, 96, 1, 16) and tuple(state.conv[0].shape) == (3, 96, 3)
