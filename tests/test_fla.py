"""Tests of delta_rule/mixers.py and pretrained/fla.py: DeltaNet and Gated DeltaNet are their recurrences, read whole,
in pieces or token by token; folders in flash-linear-attention's layout load into model.LM and compute what fla's
layers compute; every field the mixers do not implement is refused naming it; every intervention trains them.

The references below are written here, in float64 and one token at a time, from the equations of the papers and of
fla's layers (fla/layers/gla.py, delta_net.py, gated_deltanet.py; fla/modules/mlp.py), reading the tensors by fla's
names; they share no code with model.py, delta_rule/ or pretrained/. The float32 models differ from them by rounding
only (measured at most 1.2e-6 of the largest output), so 1e-5 relative separates a wrong formula from rounding; each
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


# ----------------------------------------------------------------------------------------------------------------
# Folders in flash-linear-attention's layout
# ----------------------------------------------------------------------------------------------------------------

VOCAB, LAYERS, EPS = 60, 2, 1e-6
FLA_CONFIGS = {  # tiny models with fla's field names; each leaves some fields to fla's defaults
    "gla": {"model_type": "gla", "architectures": ["GLAForCausalLM"], "hidden_size": D_MODEL,
            "num_hidden_layers": LAYERS, "num_heads": 2, "expand_k": 0.5, "expand_v": 1, "vocab_size": VOCAB,
            "norm_eps": EPS, "hidden_ratio": 4, "intermediate_size": None, "attn_mode": "chunk", "attn": None,
            "use_short_conv": False, "conv_size": 4, "use_output_gate": True, "hidden_act": "swish",
            "clamp_min": None, "feature_map": None, "num_kv_heads": None, "fuse_norm": True, "fuse_swiglu": True,
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.50.1"},
    "delta_net": {"model_type": "delta_net", "hidden_size": D_MODEL, "num_hidden_layers": LAYERS, "num_heads": 2,
                  "expand_k": 1, "expand_v": 0.5, "use_gate": False, "use_short_conv": True, "conv_size": 4,
                  "use_beta": True, "qk_norm": "l2", "qk_activation": "silu", "rms_norm_eps": EPS,
                  "intermediate_size": 48, "vocab_size": VOCAB, "tie_word_embeddings": False, "chunk_size": 64,
                  "share_conv_kernel": False, "use_rope": False, "use_output_norm": True},  # 2024's fields
    "gated_deltanet": {"model_type": "gated_deltanet", "hidden_size": D_MODEL, "num_hidden_layers": LAYERS,
                       "num_heads": 2, "head_dim": 8, "expand_v": 2, "use_gate": True, "use_short_conv": True,
                       "conv_size": 4, "norm_eps": EPS, "hidden_ratio": 2, "vocab_size": VOCAB,
                       "tie_word_embeddings": True, "allow_neg_eigval": False, "num_v_heads": None},
}


def mlp_width(config):
    """fla's GatedMLP: intermediate_size, or hidden_ratio (4) * 2/3 * hidden_size rounded up to 256."""
    if config.get("intermediate_size"):
        return config["intermediate_size"]
    return 256 * ((int(config["hidden_size"] * config.get("hidden_ratio", 4) * 2 / 3) + 255) // 256)


def fla_weights(kind, config, generator, old_layout=False):
    """Random tensors under fla's names and shapes. old_layout: the files of 2024 (one MLP gate_proj of 2 I rows,
    Gated DeltaNet's unused D, GLA's output norm as g_norm_swish_gate)."""
    D, H, W, inner = config["hidden_size"], config["num_heads"], config.get("conv_size", 4), mlp_width(config)
    if kind == "gated_deltanet":
        K, V = H * config["head_dim"], int(H * config["head_dim"] * config["expand_v"])
    else:
        K, V = int(D * config["expand_k"]), int(D * config["expand_v"])

    def rand(*shape, scale=None, shift=0.0):
        scale = shape[-1] ** -0.5 if scale is None else scale
        return torch.randn(*shape, generator=generator) * scale + shift

    w = {"model.embeddings.weight": rand(VOCAB, D, scale=1.0), "model.norm.weight": rand(D, scale=0.2, shift=1.0)}
    if not config.get("tie_word_embeddings"):
        w["lm_head.weight"] = rand(VOCAB, D)
    for i in range(config["num_hidden_layers"]):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.attn."
        w.update({p + "attn_norm.weight": rand(D, scale=0.2, shift=1.0), p + "mlp_norm.weight": rand(D, scale=0.2,
                                                                                                    shift=1.0),
                  a + "q_proj.weight": rand(K, D), a + "k_proj.weight": rand(K, D), a + "v_proj.weight": rand(V, D),
                  a + "o_proj.weight": rand(D, V), p + "mlp.down_proj.weight": rand(D, inner)})
        if old_layout:
            w[p + "mlp.gate_proj.weight"] = rand(2 * inner, D)
        else:
            w.update({p + "mlp.gate_proj.weight": rand(inner, D), p + "mlp.up_proj.weight": rand(inner, D)})
        if kind == "gla":
            norm = "g_norm_swish_gate" if config.get("fuse_norm", True) else "g_norm"
            w.update({a + "g_proj.weight": rand(V, D), a + "gk_proj.0.weight": rand(16, D),
                      a + "gk_proj.1.weight": rand(K, 16), a + "gk_proj.1.bias": rand(K, scale=1.0, shift=2.0),
                      a + f"{norm}.weight": rand(V // H, scale=0.2, shift=1.0)})
            continue
        w.update({a + "b_proj.weight": rand(H, D), a + "q_conv1d.weight": rand(K, 1, W, scale=0.5),
                  a + "k_conv1d.weight": rand(K, 1, W, scale=0.5), a + "v_conv1d.weight": rand(V, 1, W, scale=0.5),
                  a + "o_norm.weight": rand(V // H, scale=0.2, shift=1.0)})
        if kind == "gated_deltanet":
            w.update({a + "a_proj.weight": rand(H, D), a + "A_log": rand(H, scale=1.0),
                      a + "dt_bias": rand(H, scale=0.5, shift=-1.0), a + "g_proj.weight": rand(V, D)})
            if old_layout:
                w[a + "D"] = torch.ones(H)
    return w


def gla_reference(w, x, heads, eps):
    """fla's GatedLinearAttention layer (no convolution, output gate, fused or unfused norm): per head S (K, V),
    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t / sqrt(K), g_t = logsigmoid(x W_gk) / 16."""
    B, L, _ = x.shape
    q, k, v = ((x @ w[f"{n}_proj.weight"].T).unflatten(-1, (heads, -1)) for n in "qkv")
    g = F.logsigmoid((x @ w["gk_proj.0.weight"].T) @ w["gk_proj.1.weight"].T + w["gk_proj.1.bias"]) / 16
    g = g.unflatten(-1, (heads, -1))
    K, P = q.shape[-1], v.shape[-1]
    S = torch.zeros(B, heads, K, P, dtype=F64)
    o = torch.zeros(B, L, heads, P, dtype=F64)
    for t in range(L):
        S = torch.exp(g[:, t])[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        o[:, t] = (S * q[:, t, :, :, None]).sum(-2) * K ** -0.5
    norm = w.get("g_norm_swish_gate.weight", w.get("g_norm.weight"))
    o = rms_norm(o, norm, eps) * F.silu(x @ w["g_proj.weight"].T).unflatten(-1, (heads, P))
    return o.flatten(-2) @ w["o_proj.weight"].T


def fla_reference(kind, config, w, idx):
    """fla's XForCausalLM: embeddings, blocks of attn_norm -> attn -> residual -> mlp_norm -> GatedMLP (down(silu(
    gate(x)) * up(x)); in 2024's files gate_proj held [gate; up]) -> residual, final norm, lm_head. float64 logits."""
    w = {k: v.double() for k, v in w.items()}
    eps, heads = config.get("norm_eps", config.get("rms_norm_eps")), config["num_heads"]
    h = w["model.embeddings.weight"][idx]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        attn = {k[len(p + "attn."):]: v for k, v in w.items() if k.startswith(p + "attn.")}
        x = rms_norm(h, w[p + "attn_norm.weight"], eps)
        h = h + (gla_reference(attn, x, heads, eps) if kind == "gla" else
                 delta_reference(attn, x, heads, eps, gated=kind == "gated_deltanet"))
        x = rms_norm(h, w[p + "mlp_norm.weight"], eps)
        if p + "mlp.up_proj.weight" in w:
            gate, up = x @ w[p + "mlp.gate_proj.weight"].T, x @ w[p + "mlp.up_proj.weight"].T
        else:
            gate, up = (x @ w[p + "mlp.gate_proj.weight"].T).chunk(2, dim=-1)
        h = h + (F.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    head = w.get("lm_head.weight", w["model.embeddings.weight"])
    return rms_norm(h, w["model.norm.weight"], eps) @ head.T


def write_fla(folder, config, weights, filename="model.safetensors"):
    """config.json and the weights as fla's save_pretrained writes them (safetensors), or as a pickle."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if filename.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / filename))
    else:
        torch.save(weights, folder / filename)
    return folder


CASES = [("gla", False, {}), ("gla", True, {"fuse_norm": False}), ("delta_net", False, {}),
         ("delta_net", True, {}), ("gated_deltanet", False, {}), ("gated_deltanet", True, {})]


@pytest.mark.parametrize("kind,old_layout,changes", CASES,
                         ids=[f"{k}{'-2024' if old else ''}{'-unfused' if c else ''}" for k, old, c in CASES])
def test_fla_folders_load_and_compute_what_fla_computes(tmp_path, kind, old_layout, changes):
    from pretrained import load_pretrained

    config = {**FLA_CONFIGS[kind], **changes}
    weights = fla_weights(kind, config, torch.Generator().manual_seed(2), old_layout)
    model = load_pretrained(write_fla(tmp_path / kind, config, weights), backend="torch", chunk_size=8)
    idx = torch.randint(0, VOCAB, (2, 27))
    expected = fla_reference(kind, config, weights, idx)
    with torch.no_grad():
        whole, _, _ = model(idx)
        first, _, state = model(idx[:, :11])
        rest, _, _ = model(idx[:, 11:], state=state)
        steps, state = [], model.init_state(2)
        for t in range(idx.shape[1]):
            logits, state = model.step(idx[:, t], state)
            steps.append(logits)
    assert model.cfg.mixer == {"gla": "gla", "delta_net": "deltanet", "gated_deltanet": "gated_deltanet"}[kind]
    assert model.cfg.tie_embeddings == config["tie_word_embeddings"] and expected.abs().max() > 1.0
    assert relative_error(whole, expected) < 1e-5
    assert relative_error(torch.cat([first, rest], dim=1), expected) < 1e-5
    assert relative_error(torch.stack(steps, dim=1), expected) < 1e-5


def test_swapped_mlp_halves_are_caught(tmp_path):
    """2024's gate_proj is [gate; up]: read as [up; gate] the logits move far, so the test above tells them apart."""
    from pretrained import load_pretrained

    config = FLA_CONFIGS["gated_deltanet"]
    weights = fla_weights("gated_deltanet", config, torch.Generator().manual_seed(2), old_layout=True)
    swapped = dict(weights)
    for name in [n for n in weights if n.endswith("mlp.gate_proj.weight")]:
        swapped[name] = torch.cat(weights[name].chunk(2)[::-1])
    model = load_pretrained(write_fla(tmp_path, config, swapped), backend="torch", chunk_size=8)
    idx = torch.randint(0, VOCAB, (2, 19))
    with torch.no_grad():
        logits, _, _ = model(idx)
    assert relative_error(logits, fla_reference("gated_deltanet", config, weights, idx)) > 0.05


def test_a_pickled_file_and_a_hub_name_load_with_the_tokenizer(tmp_path, monkeypatch):
    """pytorch_model.bin is read too; a Hub name goes through huggingface_hub's download, with its tokenizer.json,
    and a public checkpoint gets the corpus its model card names."""
    import hashlib

    import huggingface_hub
    from huggingface_hub import errors

    from pretrained import load_pretrained

    config = FLA_CONFIGS["gla"]
    weights = fla_weights("gla", config, torch.Generator().manual_seed(3))
    served = write_fla(tmp_path / "served", config, weights, filename="pytorch_model.bin")
    (served / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')

    def fake_download(repo, filename):
        if not (served / filename).exists():
            raise errors.EntryNotFoundError(f"{filename} not in {repo}")
        return str(served / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model = load_pretrained("fla-hub/gla-1.3B-100B", backend="torch", chunk_size=8)
    idx = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        logits, _, _ = model(idx)
    assert relative_error(logits, fla_reference("gla", config, weights, idx)) < 1e-5
    assert model.trained_on["tokenizer_sha256"] == hashlib.sha256((served / "tokenizer.json").read_bytes()).hexdigest()
    assert "SlimPajama" in model.trained_on["corpus"] and model.trained_on["seq_len"] is None


def test_the_public_configs_give_the_reported_parameter_counts():
    """fla-hub/delta_net-1.3B-100B is reported to hold 1,365,677,056 parameters; linear-moe-hub/Gated-Deltanet-340M
    366,763,296, 96 of them the unused D (4 heads x 24 layers) that loading drops."""
    from model import LM
    from pretrained import fla

    counts = {}
    for name in fla.PUBLIC:
        with torch.device("meta"):
            counts[name] = LM(fla.public_config(name)).num_parameters()
    assert counts["fla-hub/delta_net-1.3B-100B"] == 1_365_677_056
    assert counts["linear-moe-hub/Gated-Deltanet-340M"] == 366_763_296 - 4 * 24
    assert abs(counts["fla-hub/gla-1.3B-100B"] / 1.3e9 - 1) < 0.06


def fla_refusal(folder):
    from pretrained import PretrainedError, load_pretrained

    with pytest.raises(PretrainedError) as info:
        load_pretrained(folder, backend="torch", chunk_size=8)
    message = str(info.value)
    assert message and "\n" not in message
    return message


FIELD_REFUSALS = [
    ("gla", {"attn": {"layers": [1], "num_heads": 2}}, "attn"),
    ("gla", {"feature_map": "relu"}, "feature_map"),
    ("gla", {"use_short_conv": True}, "use_short_conv"),
    ("gla", {"use_output_gate": False}, "use_output_gate"),
    ("gla", {"clamp_min": -1.0}, "clamp_min"),
    ("gla", {"num_kv_heads": 1}, "num_kv_heads"),
    ("gla", {"elementwise_affine": False}, "elementwise_affine"),
    ("gla", {"hidden_act": "gelu"}, "hidden_act"),
    ("gla", {"use_gv": True}, "use_gv"),
    ("gla", {"gate_logit_normalizer": 8}, "gate_logit_normalizer"),  # not a GLAConfig field: unknown
    ("delta_net", {"use_gate": True}, "use_gate"),
    ("delta_net", {"use_short_conv": False}, "use_short_conv"),
    ("delta_net", {"allow_neg_eigval": True}, "allow_neg_eigval"),
    ("delta_net", {"qk_norm": "sum"}, "qk_norm"),
    ("delta_net", {"qk_activation": "relu"}, "qk_activation"),
    ("delta_net", {"use_beta": False}, "use_beta"),
    ("delta_net", {"conv_bias": True}, "conv_bias"),
    ("delta_net", {"share_conv_kernel": True}, "share_conv_kernel"),
    ("delta_net", {"norm_first": True}, "norm_first"),
    ("delta_net", {"use_rope": True}, "use_rope"),
    ("delta_net", {"norm_eps": 1e-5}, "norm_eps"),  # beside rms_norm_eps = 1e-6: which one fla reads is unclear
    ("gated_deltanet", {"num_v_heads": 4}, "num_v_heads"),
    ("gated_deltanet", {"use_gate": False}, "use_gate"),
    ("gated_deltanet", {"allow_neg_eigval": True}, "allow_neg_eigval"),
    ("gated_deltanet", {"attnres_block_size": 2}, "attnres_block_size"),
    ("gated_deltanet", {"tie_word_embeddings": "true"}, "tie_word_embeddings"),
    ("gated_deltanet", {"num_heads": 2.5}, "num_heads"),
    ("gated_deltanet", {"head_dim": 0}, "head_dim"),
    ("gated_deltanet", {"intermediate_size": "48"}, "intermediate_size"),
]


@pytest.mark.parametrize("kind,changes,field", FIELD_REFUSALS, ids=[f"{k}-{f}" for k, _, f in FIELD_REFUSALS])
def test_fields_the_mixers_do_not_implement_are_refused_naming_them(tmp_path, kind, changes, field):
    config = FLA_CONFIGS[kind]
    weights = fla_weights(kind, config, torch.Generator().manual_seed(4))
    assert field in fla_refusal(write_fla(tmp_path, {**config, **changes}, weights))


def test_tensors_that_do_not_fit_are_refused_naming_them(tmp_path):
    config = FLA_CONFIGS["gated_deltanet"]
    good = fla_weights("gated_deltanet", config, torch.Generator().manual_seed(5))
    old = fla_weights("gated_deltanet", config, torch.Generator().manual_seed(5), old_layout=True)
    up = "model.layers.1.mlp.up_proj.weight"
    cases = [({**good, "model.layers.0.attn.h_conv1d.weight": torch.zeros(32, 1, 4)}, "h_conv1d"),
             ({**good, "model.extra.weight": torch.zeros(3)}, "model.extra.weight"),
             ({k: v for k, v in good.items() if k != "model.layers.1.mlp.gate_proj.weight"}, up),
             ({**good, up: torch.zeros(3, D_MODEL)}, "up_proj"),
             ({**old, "model.layers.0.mlp.gate_proj.weight": torch.zeros(5, D_MODEL)}, "gate_proj"),
             ({**good, "lm_head.weight": torch.zeros(VOCAB, D_MODEL)}, "lm_head.weight")]  # tied, yet different
    for i, (weights, name) in enumerate(cases):
        assert name in fla_refusal(write_fla(tmp_path / str(i), config, weights))
    untied = {**FLA_CONFIGS["delta_net"]}
    weights = fla_weights("delta_net", untied, torch.Generator().manual_seed(5))
    del weights["lm_head.weight"]
    assert "lm_head.weight" in fla_refusal(write_fla(tmp_path / "untied", untied, weights))


@pytest.mark.parametrize("kind", ["gla", "gated_deltanet"])
def test_a_loaded_fla_folder_is_post_trained_and_evaluated(tiny_corpus, tmp_path, kind):
    """--init_from and --ckpt take an fla folder as they take an official Mamba: post-training with state passing
    from its architecture, then eval.py beside the run (its T given, as the files do not say it)."""
    import runs

    config = {**FLA_CONFIGS[kind], "vocab_size": 300}  # the test corpus's bytes fit its vocabulary
    weights = {k: v[:VOCAB].repeat(5, 1) if v.shape[0] == VOCAB else v
               for k, v in fla_weights(kind, FLA_CONFIGS[kind], torch.Generator().manual_seed(6)).items()}
    folder = write_fla(tmp_path / "fla", config, weights)
    flags = without_architecture(delta_flags(tiny_corpus, tmp_path / "post", "deltanet", "--init", "state_passing",
                                             "--init_from", str(folder)))
    train_ok(flags)
    ckpt = runs.load_checkpoint(tmp_path / "post")
    assert ckpt["step"] == 2 and ckpt["model_config"]["mixer"] == kind
    assert ckpt["model_config"]["mlp_hidden"] == mlp_width(config)
    evaluation.main(["--ckpt", str(folder), "--ckpt", str(tmp_path / "post"), "--train_len", "16", "--len", "64",
                     "--num_seqs", "1", "--chunk", "32", "--out", str(tmp_path / "eval"), "--data",
                     tiny_corpus[1], "--data_dir", tiny_corpus[0], "--state_stats"])
    record = json.loads((tmp_path / "eval" / "state_stats.json").read_text())
    assert len(record["checkpoints"]) == 2
