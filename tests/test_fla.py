"""Tests of delta_rule/mixers.py and pretrained/fla.py: DeltaNet and Gated DeltaNet are their recurrences, read whole,
in pieces or token by token; folders in flash-linear-attention's layout load into model.LM and compute what fla's
layers compute; every field the mixers do not implement is refused naming it; every intervention trains them.

The references below are written here, in float64 and one token at a time, from the equations of the papers and of
fla's layers (fla/layers/gla.py, delta_net.py, gated_deltanet.py; fla/modules/mlp.py), reading the tensors by fla's
names; they share no code with model.py, delta_rule/ or pretrained/. The float32 models differ from them by rounding
only (measured below 1e-6 of the largest output), so 1e-5 relative separates a wrong formula from rounding; each
deliberate bug (beta dropped, the gate reversed, q not normalised, the MLP's halves swapped) moves the outputs by
more than 5% of the largest.
"""
import inspect
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import eval as evaluation
import train
from conftest import tiny_run_flags
from delta_rule.mixers import DeltaNet, GatedDeltaNet
from interventions import INITS
from model import ModelConfig

F64 = torch.float64
D_MODEL, HEADS, D_CONV = 32, 2, 4
CFG = dict(vocab_size=60, d_model=D_MODEL, n_layer=1, n_heads=HEADS, expand_k=1.0, expand_v=0.5, d_conv=D_CONV,
           norm_eps=1e-6, chunk_size=8, backend="torch")  # N = 16, P = 8: keys wider than values, as fla's


def relative_error(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max()).item()


# ----------------------------------------------------------------------------------------------------------------
# The references, in float64, from the equations
# ----------------------------------------------------------------------------------------------------------------

def short_conv(x, weight):
    """fla's ShortConvolution without its activation: y_t = sum_j w_j x_{t - W + 1 + j}, zeros before the start.
    x (B, L, C); weight (C, 1, W)."""
    W, L = weight.shape[-1], x.shape[1]
    padded = F.pad(x, (0, 0, W - 1, 0))
    return sum(weight[:, 0, j] * padded[:, j:j + L] for j in range(W))


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def l2(x):
    return x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)


def delta_reference(w, x, heads, eps, gated, bug=None):
    """fla's DeltaNet (gated=False) or GatedDeltaNet layer, x (B, L, D) float64 -> (B, L, D). The state is kept as
    fla keeps it, S (N, P), and updated as the papers write it: S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} +
    beta_t k_t v_t^T, o_t = S_t^T q_t / sqrt(N). bug: "beta" (dropped: beta = 1), "gate" (reversed: 1 - alpha),
    "norm" (q and k not L2-normalised)."""
    B, L, _ = x.shape
    q, k, v = (F.silu(short_conv(x @ w[f"{n}_proj.weight"].T, w[f"{n}_conv1d.weight"])) for n in "qkv")
    q, k, v = (t.unflatten(-1, (heads, -1)) for t in (q, k, v))
    if bug != "norm":
        q, k = l2(q), l2(k)
    N, P = q.shape[-1], v.shape[-1]
    beta = torch.sigmoid(x @ w["b_proj.weight"].T)  # (B, L, H)
    if bug == "beta":
        beta = torch.ones_like(beta)
    alpha = torch.ones_like(beta)
    if gated:  # Mamba-2's decay: exp(-exp(A_log) softplus(x W_a + dt_bias))
        alpha = torch.exp(-torch.exp(w["A_log"]) * F.softplus(x @ w["a_proj.weight"].T + w["dt_bias"]))
        if bug == "gate":
            alpha = 1 - alpha
    S = torch.zeros(B, heads, N, P, dtype=F64)
    o = torch.zeros(B, L, heads, P, dtype=F64)
    eye = torch.eye(N, dtype=F64)
    for t in range(L):
        for h in range(heads):
            kt, vt, b = k[:, t, h, :, None], v[:, t, h, None, :], beta[:, t, h, None, None]
            S[:, h] = alpha[:, t, h, None, None] * (eye - b * kt @ kt.transpose(1, 2)) @ S[:, h] + b * kt @ vt
            o[:, t, h] = (S[:, h].transpose(1, 2) @ q[:, t, h, :, None])[..., 0] * N ** -0.5
    o = rms_norm(o, w["o_norm.weight"], eps)
    if gated:
        o = o * F.silu(x @ w["g_proj.weight"].T).unflatten(-1, (heads, P))
    return o.flatten(-2) @ w["o_proj.weight"].T


def randomise(module, generator):
    """Every parameter away from its initial value (so that one ignored or misplaced changes the output), with the
    gate's decays spread between fast and slow."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            fan_in = p.shape[-1] if p.dim() == 2 else 1
            p.copy_(torch.randn(p.shape, generator=generator) * (0.5 if p.dim() != 2 else fan_in ** -0.5))
            if name.endswith("norm.weight"):
                p.add_(1.0)
            if name == "dt_bias":
                p.sub_(1.0)
    return module


def weights64(module):
    return {name: p.detach().double() for name, p in module.named_parameters()}


# ----------------------------------------------------------------------------------------------------------------
# The mixers are their recurrences
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mixer", [DeltaNet, GatedDeltaNet], ids=["deltanet", "gated_deltanet"])
def test_the_mixers_compute_their_recurrence_whole_in_pieces_and_token_by_token(mixer):
    cfg = ModelConfig(mixer="deltanet" if mixer is DeltaNet else "gated_deltanet", **CFG)
    module = randomise(mixer(cfg), torch.Generator().manual_seed(1))
    x = torch.randn(2, 29, D_MODEL)  # 29: not a multiple of the chunk (8)
    expected = delta_reference(weights64(module), x.double(), HEADS, cfg.norm_eps, gated=mixer is GatedDeltaNet)
    with torch.no_grad():
        whole, ssm, conv = module(x)
        pieces, state = [], (None, None)
        for a, b in ((0, 5), (5, 6), (6, 19), (19, 29)):  # uneven pieces, one of them a single token
            y, *state = module(x[:, a:b], *state)
            pieces.append(y)
        steps, state = [], module.zero_state(2, "cpu")
        for t in range(x.shape[1]):
            y, *state = module(x[:, t:t + 1], *state, one_step=True)
            steps.append(y)
    assert expected.abs().max() > 0.1  # outputs that say something
    assert relative_error(whole, expected) < 1e-5
    assert relative_error(torch.cat(pieces, dim=1), expected) < 1e-5
    assert relative_error(torch.cat(steps, dim=1), expected) < 1e-5
    assert torch.allclose(state[0], ssm, atol=1e-5) and torch.allclose(state[1], conv, atol=1e-6)
    assert ssm.shape == (2, HEADS, 8, 16) and conv.shape == (2, 2 * 32 + 16, D_CONV - 1)  # (B, H, P, N), (B, C, W-1)


@pytest.mark.parametrize("mixer,bug", [(DeltaNet, "beta"), (DeltaNet, "norm"), (GatedDeltaNet, "beta"),
                                       (GatedDeltaNet, "gate")])
def test_the_comparison_catches_a_deliberate_bug(mixer, bug):
    """The reference with one mistake is far from the mixer: the comparison above cannot pass by accident."""
    cfg = ModelConfig(mixer="deltanet" if mixer is DeltaNet else "gated_deltanet", **CFG)
    module = randomise(mixer(cfg), torch.Generator().manual_seed(1))
    x = torch.randn(2, 29, D_MODEL)
    wrong = delta_reference(weights64(module), x.double(), HEADS, cfg.norm_eps, mixer is GatedDeltaNet, bug=bug)
    with torch.no_grad():
        y, _, _ = module(x)
    assert relative_error(y, wrong) > 0.05


def test_the_delta_rule_refuses_the_triton_backend_in_one_line():
    with pytest.raises(ValueError, match="backend"):
        ModelConfig(mixer="gated_deltanet", **{**CFG, "backend": "triton"})


# ----------------------------------------------------------------------------------------------------------------
# Every intervention, eval.py's diagnostics, and nothing of it on the default commands' path
# ----------------------------------------------------------------------------------------------------------------

ARCHITECTURE = ("--mixer", "--d_model", "--n_layer", "--n_heads")


def delta_flags(tiny_corpus, out_dir, mixer, *extra):
    """A training run of a tiny DeltaNet or Gated DeltaNet (two heads of N = 8, P = 16) on the test corpus."""
    data_dir, name = tiny_corpus
    return ["--data", name, "--data_dir", data_dir, "--out_dir", str(out_dir), "--mixer", mixer, "--d_model", "32",
            "--n_layer", "1", "--n_heads", "2", "--seq_len", "16", "--batch_size", "4", "--eval_seqs", "2",
            "--eval_interval", "2", "--log_interval", "1", "--max_steps", "2", "--chunk_size", "8", "--device", "cpu",
            *extra]


def without_architecture(flags):
    """The flags of a post-training run, which takes its architecture from the checkpoint it starts from."""
    drop = {i + d for i, x in enumerate(flags) if x in ARCHITECTURE for d in (0, 1)}
    return [x for i, x in enumerate(flags) if i not in drop]


def train_ok(argv):
    try:
        train.main(argv)
    except SystemExit as exit_info:
        pytest.fail(f"train.py {' '.join(argv)} failed: {exit_info.code}")


@pytest.fixture(scope="module")
def delta_runs(tiny_corpus, tmp_path_factory):
    """A 2-step pre-trained run of each new mixer: {mixer: run folder}."""
    root = tmp_path_factory.mktemp("delta_runs")
    for mixer in ("deltanet", "gated_deltanet"):
        train_ok(delta_flags(tiny_corpus, root / mixer, mixer))
    return {mixer: root / mixer for mixer in ("deltanet", "gated_deltanet")}


@pytest.mark.parametrize("init", list(INITS))
@pytest.mark.parametrize("mixer", ["deltanet", "gated_deltanet"])
def test_every_intervention_post_trains_the_new_mixers(tiny_corpus, delta_runs, tmp_path, mixer, init):
    import runs

    flags = delta_flags(tiny_corpus, tmp_path / init, mixer, "--init", init, "--init_from", str(delta_runs[mixer]))
    train_ok(without_architecture(flags) + ([] if init == "zero" else ["--p_zero", "0.25"]))
    post, base = runs.load_checkpoint(tmp_path / init), runs.load_checkpoint(delta_runs[mixer])
    assert post["step"] == 2 and post["model_config"]["mixer"] == mixer and post["args"]["init"] == init
    assert any(not torch.equal(v, base["model"][k]) for k, v in post["model"].items())  # it trained
    if init in ("state_passing", "tbptt"):  # the state handed on is the mixer's (B, H, P, N) and its convolution's
        previous = post["ranks"][0]["intervention"]["previous"]
        assert previous["ssm"][0].shape == (4, 2, 16, 8) and previous["conv"][0].shape == (4, 2 * 16 + 32, 3)


def test_eval_diagnostics_read_the_new_mixers(tiny_corpus, delta_runs, tmp_path):
    evaluation.main(["--ckpt", str(delta_runs["deltanet"]), "--ckpt", str(delta_runs["gated_deltanet"]),
                     "--len", "96", "--num_seqs", "2", "--chunk", "32", "--out", str(tmp_path / "eval"),
                     "--data_dir", tiny_corpus[0], "--effrem", "--state_stats", "--passkey", "--passkey_lengths", "64",
                     "--passkey_trials", "1", "--bins", "8"])
    record = json.loads((tmp_path / "eval" / "loss_vs_position.json").read_text())
    assert [c["label"] for c in record["checkpoints"]] == ["deltanet", "gated_deltanet"]
    for c in record["checkpoints"]:
        assert c["T"] == 16 and c["summary"]["[T/2,T)"] > 0 and len(c["bins"]["loss"]) == len(c["bins"]["control"])
    for name in ("loss_vs_position.png", "effrem.png", "state_stats.png", "passkey.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0


def functions_of_delta_rule_entered(run):
    """The names of delta_rule/'s functions (not its module or class bodies) that run() enters."""
    entered, folder = set(), f"{os.sep}delta_rule{os.sep}"

    def profile(frame, event, arg):
        code = frame.f_code
        if event == "call" and code.co_flags & inspect.CO_OPTIMIZED and folder in code.co_filename:
            entered.add(code.co_name)

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return entered


def test_the_default_commands_run_nothing_of_delta_rule(tiny_corpus, delta_runs, tmp_path):
    """delta_rule/ is imported by model.py (its mixers register in MIXERS), but a Mamba-2 run and its evaluation call
    none of its functions: the reader's path of the default commands is what it was. A DeltaNet run does."""
    def mamba2():
        train_ok(tiny_run_flags(tiny_corpus, tmp_path / "zero", "--max_steps", "2"))
        evaluation.main(["--ckpt", str(tmp_path / "zero"), "--len", "64", "--num_seqs", "1", "--out",
                         str(tmp_path / "eval"), "--data_dir", tiny_corpus[0]])

    assert functions_of_delta_rule_entered(mamba2) == set()
    assert "chunked_delta_rule" in functions_of_delta_rule_entered(lambda: evaluation.main(
        ["--ckpt", str(delta_runs["deltanet"]), "--len", "64", "--num_seqs", "1", "--out", str(tmp_path / "dn"),
         "--data_dir", tiny_corpus[0]]))
