"""Tests of pretrained/: a small random Mamba-2 written in both public layouts loads into model.LM and computes what
mamba_ssm's equations say; every unsupported field and every broken file is a one-line PretrainedError.

The reference forward below is written from the official Mamba2 module's equations as a token-by-token float64
recurrence over the raw tensors, read by their official names; it shares no code with model.py or scan_kernels.py. The
float32 model differs from it by float32 rounding only (measured 4e-7 of the largest logit, ~35), so 1e-5 relative
catches any real difference: an ungrouped gated norm, a dropped D or a reversed convolution moves the logits by
0.4 to 0.95 of the largest.
"""
import hashlib
import json
import sys

import pytest
import torch
import torch.nn.functional as F

import pretrained
from model import LM
from pretrained import PretrainedError, load_pretrained, official_config, official_name_of

# A small Mamba-2 with two q/k groups (so a wrong head-to-group map or an ungrouped norm shows), an odd vocabulary
# padded to 16 and a length that is not a multiple of the scan's chunk size.
D_MODEL, N_LAYER, D_STATE, HEADDIM, NGROUPS, D_CONV, VOCAB = 32, 2, 16, 8, 2, 4, 100
D_INNER, PADDED_VOCAB = 2 * D_MODEL, 112
NHEADS = D_INNER // HEADDIM
LOAD = dict(backend="torch", chunk_size=16)

MAMBA_SSM_CONFIG = {
    "d_model": D_MODEL, "d_intermediate": 0, "n_layer": N_LAYER, "vocab_size": VOCAB,
    "ssm_cfg": {"layer": "Mamba2", "d_state": D_STATE, "headdim": HEADDIM, "ngroups": NGROUPS, "chunk_size": 256},
    "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
    "pad_vocab_size_multiple": 16, "tie_embeddings": True,
}
TRANSFORMERS_CONFIG = {
    "architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", "hidden_size": D_MODEL,
    "num_hidden_layers": N_LAYER, "vocab_size": PADDED_VOCAB, "state_size": D_STATE, "head_dim": HEADDIM,
    "num_heads": NHEADS, "n_groups": NGROUPS, "expand": 2, "conv_kernel": D_CONV, "layer_norm_epsilon": 1e-5,
    "use_bias": False, "use_conv_bias": True, "hidden_act": "silu", "time_step_limit": [0.0, float("inf")],
    "rms_norm": True, "residual_in_fp32": True, "tie_word_embeddings": True, "chunk_size": 256,
    "time_step_rank": 2, "time_step_min": 0.001, "time_step_max": 0.1, "time_step_floor": 1e-4,
    "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "torch_dtype": "float32",
    "transformers_version": "4.44.0", "use_cache": True,
}


def random_weights():
    """Official tensor names and shapes, with every parameter away from its initial value so that a parameter
    that is ignored, misplaced or used in the wrong order changes the logits."""
    g = torch.Generator().manual_seed(1)

    def rand(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g) * scale + shift

    conv_dim = D_INNER + 2 * NGROUPS * D_STATE
    state = {"backbone.embedding.weight": rand(PADDED_VOCAB, D_MODEL)}
    for i in range(N_LAYER):
        p = f"backbone.layers.{i}."
        state[p + "norm.weight"] = rand(D_MODEL, scale=0.2, shift=1.0)
        state[p + "mixer.in_proj.weight"] = rand(2 * D_INNER + 2 * NGROUPS * D_STATE + NHEADS, D_MODEL,
                                                 scale=D_MODEL ** -0.5)
        state[p + "mixer.conv1d.weight"] = rand(conv_dim, 1, D_CONV, scale=0.5)
        state[p + "mixer.conv1d.bias"] = rand(conv_dim, scale=0.3)
        state[p + "mixer.dt_bias"] = rand(NHEADS, scale=0.5, shift=-1.0)
        state[p + "mixer.A_log"] = rand(NHEADS)  # decay rates from e^-2 to e^2: slow and fast memories
        state[p + "mixer.D"] = rand(NHEADS)
        state[p + "mixer.norm.weight"] = rand(D_INNER, scale=0.2, shift=1.0)
        state[p + "mixer.out_proj.weight"] = rand(D_MODEL, D_INNER, scale=D_INNER ** -0.5)
    state["backbone.norm_f.weight"] = rand(D_MODEL, scale=0.2, shift=1.0)
    return state


def write_mamba_ssm(folder, state, config=MAMBA_SSM_CONFIG):
    """What mamba_ssm's save_pretrained writes: config.json and torch.save(state_dict), lm_head included (tied)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    torch.save({**state, "lm_head.weight": state["backbone.embedding.weight"]}, folder / "pytorch_model.bin")
    return folder


def write_transformers(folder, state, config=TRANSFORMERS_CONFIG):
    """The transformers layout: model.safetensors with backbone.embeddings.weight and no lm_head (tied)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))  # writes time_step_limit's inf as Infinity, as json does
    renamed = {k.replace("backbone.embedding.", "backbone.embeddings."): v.contiguous() for k, v in state.items()}
    save_file(renamed, str(folder / "model.safetensors"))
    return folder


# ----------------------------------------------------------------------------------------------------------------
# The reference: mamba_ssm's Mamba2 language model, one token at a time, in float64
# ----------------------------------------------------------------------------------------------------------------

def rms_norm(x, weight, group_size=None, eps=1e-5):
    """x / rms(x) * weight, the rms taken over groups of group_size channels (all channels when None)."""
    shape = x.shape
    x = x.unflatten(-1, (-1, group_size or shape[-1]))
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).reshape(shape) * weight


def reference_mixer(w, u):
    """Official Mamba2 mixer.  u (B, L, D) float64; w: the layer's mixer tensors by official name."""
    B, L, _ = u.shape
    H, G, P, N = NHEADS, NGROUPS, HEADDIM, D_STATE
    zxbcdt = u @ w["in_proj.weight"].T  # order [z, x, B, C, dt]
    z, xBC, dt = zxbcdt.split([D_INNER, D_INNER + 2 * G * N, H], dim=-1)
    # causal depthwise convolution: W - 1 zeros before the first token, the last tap on the current input
    padded = F.pad(xBC, (0, 0, D_CONV - 1, 0))
    conv = w["conv1d.bias"] + sum(w["conv1d.weight"][:, 0, j] * padded[:, j:j + L] for j in range(D_CONV))
    x, Bm, Cm = F.silu(conv).split([D_INNER, G * N, G * N], dim=-1)
    x, Bm, Cm = x.unflatten(-1, (H, P)), Bm.unflatten(-1, (G, N)), Cm.unflatten(-1, (G, N))
    dt = F.softplus(dt + w["dt_bias"])  # (B, L, H)
    A = -torch.exp(w["A_log"])
    S = torch.zeros(B, H, P, N, dtype=u.dtype)
    y = torch.zeros(B, L, H, P, dtype=u.dtype)
    for t in range(L):
        for h in range(H):
            g = h // (H // G)  # heads are split among groups in order
            S[:, h] = (torch.exp(dt[:, t, h] * A[h])[:, None, None] * S[:, h]
                       + dt[:, t, h, None, None] * x[:, t, h, :, None] * Bm[:, t, g, None, :])
            y[:, t, h] = (S[:, h] @ Cm[:, t, g, :, None])[..., 0] + w["D"][h] * x[:, t, h]
    gated = y.flatten(-2) * F.silu(z)  # norm_before_gate=False: gate, then a norm per group
    return rms_norm(gated, w["norm.weight"], group_size=D_INNER // G) @ w["out_proj.weight"].T


def reference_logits(state, idx):
    """Logits over all embedding rows (B, L, padded vocabulary) of the official model, float64."""
    state = {k: v.double() for k, v in state.items()}
    h = state["backbone.embedding.weight"][idx]
    for i in range(N_LAYER):
        p = f"backbone.layers.{i}."
        mixer = {k[len(p + "mixer."):]: v for k, v in state.items() if k.startswith(p + "mixer.")}
        h = h + reference_mixer(mixer, rms_norm(h, state[p + "norm.weight"]))
    head = state.get("lm_head.weight", state["backbone.embedding.weight"])  # tied when there is none
    return rms_norm(h, state["backbone.norm_f.weight"]) @ head.T


def relative_error(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


# ----------------------------------------------------------------------------------------------------------------
# Loading computes the official function
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["mamba_ssm", "transformers"])
def test_both_layouts_compute_the_official_model(tmp_path, layout):
    state = random_weights()
    write = write_mamba_ssm if layout == "mamba_ssm" else write_transformers
    model = load_pretrained(write(tmp_path / layout, state), **LOAD)
    assert not model.training and model.lm_head.weight is model.backbone.embedding.weight
    vocab = VOCAB if layout == "mamba_ssm" else PADDED_VOCAB  # transformers' vocab_size counts the padding rows
    idx = torch.randint(0, vocab, (2, 37))
    expected = reference_logits(state, idx)[..., :vocab]
    with torch.no_grad():
        whole, _, _ = model(idx)
        first, _, state_after = model(idx[:, :13])
        rest, _, _ = model(idx[:, 13:], state=state_after)
        steps, step_state = [], model.init_state(2)
        for t in range(idx.shape[1]):
            logits, step_state = model.step(idx[:, t], step_state)
            steps.append(logits)
    assert expected.abs().max() > 1.0  # logits that say something
    assert relative_error(whole, expected) < 1e-5
    assert relative_error(torch.cat([first, rest], dim=1), expected) < 1e-5
    assert relative_error(torch.stack(steps, dim=1), expected) < 1e-5


def test_an_untied_output_layer_and_transformers_5_configs_load(tmp_path):
    """transformers 5 writes time_step_limit's infinity as {"__float__": "Infinity"} and tie_word_embeddings false;
    real transformers-layout Mamba-2 models have an lm_head of their own. Both load and compute the reference."""
    from safetensors.torch import save_file

    state = random_weights()
    head = torch.randn(PADDED_VOCAB, D_MODEL) * D_MODEL ** -0.5
    config = {**TRANSFORMERS_CONFIG, "tie_word_embeddings": False, "time_step_limit": [0.0, {"__float__": "Infinity"}]}
    folder = write_transformers(tmp_path / "untied", state, config)
    save_file({**{k.replace("backbone.embedding.", "backbone.embeddings."): v.contiguous() for k, v in state.items()},
               "lm_head.weight": head}, str(folder / "model.safetensors"))
    model = load_pretrained(folder, **LOAD)
    assert not model.cfg.tie_embeddings and model.lm_head.weight is not model.backbone.embedding.weight
    idx = torch.randint(0, PADDED_VOCAB, (2, 21))
    with torch.no_grad():
        logits, _, _ = model(idx)
    assert relative_error(logits, reference_logits({**state, "lm_head.weight": head}, idx)) < 1e-5
    # an untied config whose lm_head is a copy of the embedding is the tied model
    save_file({**{k.replace("backbone.embedding.", "backbone.embeddings."): v.contiguous() for k, v in state.items()},
               "lm_head.weight": state["backbone.embedding.weight"].clone()}, str(folder / "model.safetensors"))
    assert load_pretrained(folder, **LOAD).cfg.tie_embeddings
    # mamba_ssm's layout says tie_embeddings false, and saves its lm_head
    folder = write_mamba_ssm(tmp_path / "ssm", state, {**MAMBA_SSM_CONFIG, "tie_embeddings": False})
    torch.save({**state, "lm_head.weight": head}, folder / "pytorch_model.bin")
    model = load_pretrained(folder, **LOAD)
    with torch.no_grad():
        logits, _, _ = model(idx % VOCAB)
    expected = reference_logits({**state, "lm_head.weight": head}, idx % VOCAB)[..., :VOCAB]
    assert not model.cfg.tie_embeddings and relative_error(logits, expected) < 1e-5


def test_both_layouts_load_the_same_numbers(tmp_path):
    state = random_weights()
    a = load_pretrained(write_mamba_ssm(tmp_path / "a", state), **LOAD)
    b = load_pretrained(write_transformers(tmp_path / "b", state), **LOAD)
    assert a.cfg.chunk_size == 16 and a.cfg.backend == "torch" and a.cfg.ngroups == NGROUPS
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_a_full_width_d_ssm_is_the_default(tmp_path):
    config = json.loads(json.dumps(MAMBA_SSM_CONFIG))
    config["ssm_cfg"]["d_ssm"] = D_INNER
    model = load_pretrained(write_mamba_ssm(tmp_path, random_weights(), config), **LOAD)
    assert model.cfg.expand * model.cfg.d_model == D_INNER


# ----------------------------------------------------------------------------------------------------------------
# What the model was trained with
# ----------------------------------------------------------------------------------------------------------------

def test_trained_on_of_a_folder_without_tokenizer_is_unknown(tmp_path):
    folder = write_transformers(tmp_path / "m", random_weights())
    assert load_pretrained(folder, **LOAD).trained_on == dict(
        tokenizer=None, tokenizer_sha256=None, seq_len=None, corpus=None, source=str(folder.resolve()))


def test_mamba_ssm_vocabulary_of_50277_is_gpt_neox(tmp_path):
    state = random_weights()
    state["backbone.embedding.weight"] = torch.randn(50288, D_MODEL) * 0.1  # 50277 padded to 16
    model = load_pretrained(write_mamba_ssm(tmp_path, state, {**MAMBA_SSM_CONFIG, "vocab_size": 50277}), **LOAD)
    assert model.trained_on["tokenizer"] == "EleutherAI/gpt-neox-20b"
    assert model.trained_on["seq_len"] is None  # not an official size: its training length is not known


def test_official_configs_are_recognised_in_both_layouts():
    """The config.json of state-spaces/mamba2-130m, and the same model converted to the transformers layout."""
    official = {"d_model": 768, "d_intermediate": 0, "n_layer": 24, "vocab_size": 50277,
                "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
                "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 16,
                "tie_embeddings": True}
    converted = {**TRANSFORMERS_CONFIG, "hidden_size": 768, "num_hidden_layers": 24, "vocab_size": 50288,
                 "state_size": 128, "head_dim": 64, "num_heads": 24, "n_groups": 1}
    for config in (official, converted):
        cfg, _ = pretrained.config_from_json(config)
        assert official_name_of(cfg) == "state-spaces/mamba2-130m"
    cfg, _ = pretrained.config_from_json({**official, "n_layer": 23})
    assert official_name_of(cfg) is None


def test_hub_download_uses_huggingface_hub(tmp_path, monkeypatch):
    """A Hub model served from a folder: config.json, model.safetensors (no pytorch_model.bin) and a tokenizer."""
    import huggingface_hub
    from huggingface_hub import errors

    served = write_transformers(tmp_path / "served", random_weights())
    (served / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    asked = []

    def fake_download(repo, filename):
        asked.append((repo, filename))
        if not (served / filename).exists():
            raise errors.EntryNotFoundError(f"{filename} not in {repo}")
        return str(served / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model = load_pretrained("someone/tiny-mamba2", **LOAD)
    assert ("someone/tiny-mamba2", "config.json") in asked
    sha = hashlib.sha256((served / "tokenizer.json").read_bytes()).hexdigest()
    assert model.trained_on == dict(tokenizer=str((served / "tokenizer.json").resolve()), tokenizer_sha256=sha,
                                    seq_len=None, corpus=None, source="someone/tiny-mamba2")


# ----------------------------------------------------------------------------------------------------------------
# Refusals: one line naming the field, the tensor or what to do
# ----------------------------------------------------------------------------------------------------------------

def refusal(*args, **kwargs):
    with pytest.raises(PretrainedError) as info:
        load_pretrained(*args, **{**LOAD, **kwargs})
    message = str(info.value)
    assert "\n" not in message and message
    return message


def with_ssm(**fields):
    return {**MAMBA_SSM_CONFIG, "ssm_cfg": {**MAMBA_SSM_CONFIG["ssm_cfg"], **fields}}


MAMBA_SSM_REFUSALS = [
    ({**MAMBA_SSM_CONFIG, "attn_layer_idx": [1]}, "attn_layer_idx"),
    ({**MAMBA_SSM_CONFIG, "d_intermediate": 64}, "d_intermediate"),
    ({**MAMBA_SSM_CONFIG, "rms_norm": False}, "rms_norm"),
    ({**MAMBA_SSM_CONFIG, "n_mamba_heads": 3}, "n_mamba_heads"),
    (with_ssm(D_has_hdim=True), "D_has_hdim"),
    (with_ssm(norm_before_gate=True), "norm_before_gate"),
    (with_ssm(dt_limit=[0.0, 10.0]), "dt_limit"),
    (with_ssm(rmsnorm=False), "rmsnorm"),
    (with_ssm(bias=True), "bias"),
    (with_ssm(conv_bias=False), "conv_bias"),
    (with_ssm(d_ssm=32), "d_ssm"),
    (with_ssm(layer="Mamba3"), "Mamba3"),
    (with_ssm(headdim=24), "headdim"),  # 64 channels do not split into heads of 24
]
TRANSFORMERS_REFUSALS = [
    ({**TRANSFORMERS_CONFIG, "model_type": "mamba3"}, "model_type"),
    ({**TRANSFORMERS_CONFIG, "use_bias": True}, "use_bias"),
    ({**TRANSFORMERS_CONFIG, "use_conv_bias": False}, "use_conv_bias"),
    ({**TRANSFORMERS_CONFIG, "time_step_limit": [0.0, 5.0]}, "time_step_limit"),
    ({**TRANSFORMERS_CONFIG, "rms_norm": False}, "rms_norm"),
    ({**TRANSFORMERS_CONFIG, "tie_word_embeddings": False}, "lm_head.weight"),  # untied, but no head in the file
    ({k: v for k, v in TRANSFORMERS_CONFIG.items() if k != "tie_word_embeddings"}, "lm_head.weight"),
    ({**TRANSFORMERS_CONFIG, "hidden_act": "gelu"}, "hidden_act"),
    ({**TRANSFORMERS_CONFIG, "norm_before_gate": True}, "norm_before_gate"),
    ({**TRANSFORMERS_CONFIG, "num_heads": 4}, "num_heads"),
    ({**TRANSFORMERS_CONFIG, "attention_layers_idx": [1]}, "attention_layers_idx"),
]


@pytest.mark.parametrize("config,field", MAMBA_SSM_REFUSALS, ids=[f for _, f in MAMBA_SSM_REFUSALS])
def test_mamba_ssm_fields_not_implemented_are_refused(tmp_path, config, field):
    assert field in refusal(write_mamba_ssm(tmp_path, random_weights(), config))


@pytest.mark.parametrize("config,field", TRANSFORMERS_REFUSALS, ids=[f for _, f in TRANSFORMERS_REFUSALS])
def test_transformers_fields_not_implemented_are_refused(tmp_path, config, field):
    assert field in refusal(write_transformers(tmp_path, random_weights(), config))


@pytest.mark.parametrize("name,tensor", [
    ("backbone.layers.1.mixer.D", None),
    ("backbone.layers.0.mixer.dt_bias", torch.zeros(NHEADS + 1)),
    ("backbone.layers.0.mixer.z_bias", torch.zeros(D_INNER)),
    ("backbone.layers.1.mixer.A_log", torch.full((NHEADS,), float("nan"))),
    ("lm_head.weight", torch.randn(PADDED_VOCAB, D_MODEL)),
], ids=["missing", "mis-shaped", "unexpected", "non-finite", "untied"])
def test_bad_tensors_are_named(tmp_path, name, tensor):
    """The tensor name (None: removed) replaced in an otherwise good transformers-layout file."""
    from safetensors.torch import save_file

    folder = write_transformers(tmp_path, random_weights())
    state = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in random_weights().items()}
    if tensor is None:
        del state[name]
    else:
        state[name] = tensor
    save_file(state, str(folder / "model.safetensors"))
    assert name in refusal(folder)


@pytest.mark.parametrize("layout", ["mamba_ssm", "transformers"])
def test_truncated_weight_file(tmp_path, layout):
    folder = (write_mamba_ssm if layout == "mamba_ssm" else write_transformers)(tmp_path, random_weights())
    path = folder / ("pytorch_model.bin" if layout == "mamba_ssm" else "model.safetensors")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    message = refusal(folder)
    assert "truncated or corrupt" in message and path.name in message


def test_missing_files_and_bad_arguments(tmp_path):
    folder = write_transformers(tmp_path / "m", random_weights())
    assert "cannot override d_state" in refusal(folder, d_state=64)
    assert "is a file" in refusal(folder / "config.json")
    assert "no folder" in refusal(str(tmp_path / "nowhere"))
    (folder / "config.json").write_text("{not json")
    assert "config.json" in refusal(folder)
    (folder / "config.json").unlink()
    assert "has no config.json" in refusal(folder)
    (folder / "config.json").write_text(json.dumps(TRANSFORMERS_CONFIG))
    (folder / "model.safetensors").unlink()
    assert "no weight file" in refusal(folder)


def test_offline_hub_name_says_what_to_do(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    def offline(repo, filename):
        raise errors.LocalEntryNotFoundError("cannot reach huggingface.co and the file is not in the cache")

    monkeypatch.chdir(tmp_path)  # no folder of that name here
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    message = refusal("state-spaces/mamba2-370m")
    assert "state-spaces/mamba2-370m" in message and "HF_HUB_OFFLINE" in message  # names the model and the way out


def test_without_huggingface_hub_says_pip_install(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as when it is not installed
    assert "pip install huggingface_hub" in refusal("state-spaces/mamba2-370m")


# ----------------------------------------------------------------------------------------------------------------
# The table of official models
# ----------------------------------------------------------------------------------------------------------------

def official_parameters(d_model, n_layer, vocab_rows=50288, d_state=128, headdim=64, d_conv=4):
    """Parameters of an official Mamba-2 LM from mamba_ssm's tensor shapes (tied embedding counted once)."""
    d_inner = 2 * d_model
    heads, conv_dim = d_inner // headdim, d_inner + 2 * d_state
    layer = (d_model  # norm
             + d_model * (2 * d_inner + 2 * d_state + heads)  # in_proj
             + conv_dim * (d_conv + 1)  # conv1d weight and bias
             + 3 * heads + d_inner  # dt_bias, A_log, D; gated norm
             + d_inner * d_model)  # out_proj
    return vocab_rows * d_model + n_layer * layer + d_model


@pytest.mark.parametrize("name,nominal", [("state-spaces/mamba2-130m", 130e6), ("state-spaces/mamba2-370m", 370e6),
                                          ("state-spaces/mamba2-780m", 780e6), ("state-spaces/mamba2-1.3b", 1.3e9),
                                          ("state-spaces/mamba2-2.7b", 2.7e9)])
def test_official_table_gives_the_official_sizes(name, nominal):
    cfg = official_config(name)
    with torch.device("meta"):  # counts parameters without allocating them
        count = LM(cfg).num_parameters()
    assert count == official_parameters(**{k: v for k, v in pretrained.OFFICIAL[name].items() if k != "mixer"})
    # the names round: 128.99M, 368.35M, 780.16M, 1343.76M (the 1.3b is 3.4% above its name), 2702.60M
    assert abs(count / nominal - 1) < 0.035
    assert official_name_of(cfg) == name and official_config(name.split("/")[1]) == cfg


def test_mamba2_130m_count_matches_the_model_preset():
    """tests/test_model.py's mamba2-130m preset has 129,001,920 parameters with the GPT-2 vocabulary padded to 64
    (50304 rows); the official model has 50288 rows, 16 fewer rows of 768."""
    with torch.device("meta"):
        assert LM(official_config("mamba2-130m")).num_parameters() == 129_001_920 - 16 * 768 == 128_989_632
    with pytest.raises(PretrainedError, match="unknown official model"):
        official_config("mamba2-7b")


def test_a_config_claiming_more_layers_than_the_weights_hold_is_refused_before_building(tmp_path):
    """A config.json that says n_layer = 100000 beside the weights of 2 layers: refused at once, naming the field,
    without building (or allocating) a model of 100000 layers first."""
    import time

    folder = write_mamba_ssm(tmp_path, random_weights(), {**MAMBA_SSM_CONFIG, "n_layer": 100000})
    started = time.perf_counter()
    assert "n_layer" in refusal(folder)
    assert time.perf_counter() - started < 10


# ----------------------------------------------------------------------------------------------------------------
# Mamba-1: the official checkpoints (state-spaces/mamba-130m ... -2.8b) in both layouts
# ----------------------------------------------------------------------------------------------------------------

M1_STATE, M1_INNER, M1_RANK = 8, 2 * D_MODEL, 2  # dt_rank = ceil(32 / 16)
MAMBA1_SSM_CONFIG = {"d_model": D_MODEL, "n_layer": N_LAYER, "vocab_size": VOCAB, "ssm_cfg": {"d_state": M1_STATE},
                     "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 16}
MAMBA1_TRANSFORMERS_CONFIG = {
    "architectures": ["MambaForCausalLM"], "model_type": "mamba", "hidden_size": D_MODEL, "n_layer": N_LAYER,
    "num_hidden_layers": N_LAYER, "vocab_size": PADDED_VOCAB, "state_size": M1_STATE, "expand": 2,
    "intermediate_size": M1_INNER, "conv_kernel": D_CONV, "layer_norm_epsilon": 1e-5, "use_bias": False,
    "use_conv_bias": True, "hidden_act": "silu", "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
    "time_step_rank": M1_RANK, "time_step_scale": 1.0, "time_step_min": 0.001, "time_step_max": 0.1,
    "time_step_init_scheme": "random", "time_step_floor": 1e-4, "pad_vocab_size_multiple": 8,
    "rescale_prenorm_residual": False, "initializer_range": 0.1, "bos_token_id": 0, "eos_token_id": 0,
    "pad_token_id": 0, "torch_dtype": "float32", "transformers_version": "4.39.0.dev0", "use_cache": True,
}


def mamba1_weights():
    """Official Mamba-1 tensor names and shapes, every parameter away from its initial value."""
    g = torch.Generator().manual_seed(2)

    def rand(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g) * scale + shift

    state = {"backbone.embedding.weight": rand(PADDED_VOCAB, D_MODEL)}
    for i in range(N_LAYER):
        p = f"backbone.layers.{i}."
        state[p + "norm.weight"] = rand(D_MODEL, scale=0.2, shift=1.0)
        state[p + "mixer.in_proj.weight"] = rand(2 * M1_INNER, D_MODEL, scale=D_MODEL ** -0.5)
        state[p + "mixer.conv1d.weight"] = rand(M1_INNER, 1, D_CONV, scale=0.5)
        state[p + "mixer.conv1d.bias"] = rand(M1_INNER, scale=0.3)
        state[p + "mixer.x_proj.weight"] = rand(M1_RANK + 2 * M1_STATE, M1_INNER, scale=M1_INNER ** -0.5)
        state[p + "mixer.dt_proj.weight"] = rand(M1_INNER, M1_RANK, scale=0.5)
        state[p + "mixer.dt_proj.bias"] = rand(M1_INNER, scale=0.5, shift=-2.0)
        state[p + "mixer.A_log"] = rand(M1_INNER, M1_STATE, scale=0.5, shift=0.5)
        state[p + "mixer.D"] = rand(M1_INNER)
        state[p + "mixer.out_proj.weight"] = rand(D_MODEL, M1_INNER, scale=M1_INNER ** -0.5)
    state["backbone.norm_f.weight"] = rand(D_MODEL, scale=0.2, shift=1.0)
    return state


def mamba1_reference_logits(state, idx):
    """The official Mamba-1 language model in float64: embedding, per layer x + mixer(RMSNorm(x)), final norm, tied
    head; the mixer is test_model.reference_mamba1, written from the paper's recurrence."""
    from test_model import reference_mamba1

    state = {k: v.double() for k, v in state.items()}
    h = state["backbone.embedding.weight"][idx]
    for i in range(N_LAYER):
        p = f"backbone.layers.{i}."
        mixer = {k[len(p + "mixer."):]: v for k, v in state.items() if k.startswith(p + "mixer.")}
        h = h + reference_mamba1(mixer, rms_norm(h, state[p + "norm.weight"]))
    return rms_norm(h, state["backbone.norm_f.weight"]) @ state["backbone.embedding.weight"].T


@pytest.mark.parametrize("layout", ["mamba_ssm", "transformers"])
def test_both_mamba1_layouts_compute_the_official_model(tmp_path, layout):
    state = mamba1_weights()
    if layout == "mamba_ssm":
        folder = write_mamba_ssm(tmp_path / layout, state, MAMBA1_SSM_CONFIG)
    else:
        folder = write_transformers(tmp_path / layout, state, MAMBA1_TRANSFORMERS_CONFIG)
    model = load_pretrained(folder, **LOAD)
    assert model.cfg.mixer == "mamba1" and model.lm_head.weight is model.backbone.embedding.weight
    vocab = VOCAB if layout == "mamba_ssm" else PADDED_VOCAB
    idx = torch.randint(0, vocab, (2, 37))
    expected = mamba1_reference_logits(state, idx)[..., :vocab]
    with torch.no_grad():
        whole, _, _ = model(idx)
        first, _, after = model(idx[:, :13])
        rest, _, _ = model(idx[:, 13:], state=after)
        steps, step_state = [], model.init_state(2)
        for t in range(idx.shape[1]):
            logits, step_state = model.step(idx[:, t], step_state)
            steps.append(logits)
    assert expected.abs().max() > 1.0
    assert relative_error(whole, expected) < 1e-5
    assert relative_error(torch.cat([first, rest], dim=1), expected) < 1e-5
    assert relative_error(torch.stack(steps, dim=1), expected) < 1e-5


def test_official_mamba1_configs_are_recognised_in_both_layouts():
    """The config.json of state-spaces/mamba-130m (its ssm_cfg is empty: Mamba-1 is mamba_ssm's default layer) and
    of state-spaces/mamba-130m-hf (transformers' MambaForCausalLM)."""
    official = {"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {}, "rms_norm": True,
                "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8}
    hf = {**MAMBA1_TRANSFORMERS_CONFIG, "hidden_size": 768, "n_layer": 24, "num_hidden_layers": 24,
          "vocab_size": 50280, "state_size": 16, "intermediate_size": 1536, "time_step_rank": 48}
    for config in (official, hf):
        cfg, _ = pretrained.config_from_json(config)
        assert official_name_of(cfg) == "state-spaces/mamba-130m" and cfg.mixer == "mamba1"
    counts = {name: pretrained.official_config(name) for name in ("mamba-130m", "mamba-2.8b")}
    with torch.device("meta"):
        assert LM(counts["mamba-130m"]).num_parameters() == 129_135_360  # mamba_ssm's count of the 130m


MAMBA1_REFUSALS = [
    ({**MAMBA1_SSM_CONFIG, "ssm_cfg": {"bias": True}}, "bias"),
    ({**MAMBA1_SSM_CONFIG, "ssm_cfg": {"conv_bias": False}}, "conv_bias"),
    ({**MAMBA1_SSM_CONFIG, "ssm_cfg": {"dt_rank": 5}}, "dt_rank"),
    ({**MAMBA1_SSM_CONFIG, "ssm_cfg": {"headdim": 8}}, "headdim"),  # a Mamba-2 field in a Mamba-1 config
    ({**MAMBA1_TRANSFORMERS_CONFIG, "use_bias": True}, "use_bias"),
    ({**MAMBA1_TRANSFORMERS_CONFIG, "time_step_rank": 7}, "time_step_rank"),
    ({**MAMBA1_TRANSFORMERS_CONFIG, "intermediate_size": 100}, "intermediate_size"),
    ({**MAMBA1_TRANSFORMERS_CONFIG, "hidden_act": "gelu"}, "hidden_act"),
]


@pytest.mark.parametrize("config,field", MAMBA1_REFUSALS, ids=[f for _, f in MAMBA1_REFUSALS])
def test_mamba1_fields_not_implemented_are_refused(tmp_path, config, field):
    write = write_transformers if "model_type" in config else write_mamba_ssm
    assert field in refusal(write(tmp_path, mamba1_weights(), config))


# ----------------------------------------------------------------------------------------------------------------
# Numbers in config.json: a whole float is the integer, anything else that is not a positive number is refused
# ----------------------------------------------------------------------------------------------------------------

CONFIGS = {"transformers": TRANSFORMERS_CONFIG, "mamba_ssm": MAMBA_SSM_CONFIG,
           "transformers mamba1": MAMBA1_TRANSFORMERS_CONFIG, "mamba_ssm mamba1": MAMBA1_SSM_CONFIG}


def with_field(layout, field, value):
    """CONFIGS[layout] with field (ssm_cfg.name for a field of ssm_cfg) set to value."""
    config = json.loads(json.dumps(CONFIGS[layout]))
    *section, name = field.split(".")
    (config[section[0]] if section else config)[name] = value
    return config


BAD_NUMBERS = [
    ("transformers", "num_hidden_layers", 2.5), ("transformers", "num_hidden_layers", True),
    ("transformers", "num_hidden_layers", None), ("transformers", "state_size", 16.5),
    ("transformers", "vocab_size", 257.5), ("transformers", "hidden_size", "32"), ("transformers", "hidden_size", -32),
    ("transformers", "n_groups", 0), ("transformers", "layer_norm_epsilon", "1e-5"),
    ("transformers", "time_step_min", -0.001), ("transformers mamba1", "state_size", 8.5),
    ("transformers mamba1", "intermediate_size", 64.5), ("transformers mamba1", "time_step_rank", 2.5),
    ("transformers mamba1", "n_layer", True), ("mamba_ssm", "n_layer", 2.5), ("mamba_ssm", "d_model", "32"),
    ("mamba_ssm", "pad_vocab_size_multiple", 0), ("mamba_ssm", "ssm_cfg.d_state", True),
    ("mamba_ssm", "ssm_cfg.headdim", 8.5), ("mamba_ssm", "ssm_cfg.dt_min", None),
    ("mamba_ssm", "ssm_cfg.A_init_range", [1, "16"]), ("mamba_ssm mamba1", "ssm_cfg.dt_rank", 2.5),
    ("mamba_ssm mamba1", "ssm_cfg.expand", float("inf")),
    ("transformers", "hidden_size", 1e20), ("mamba_ssm", "vocab_size", 10 ** 30),  # beyond torch's sizes
    ("transformers", "tie_word_embeddings", "false"), ("mamba_ssm", "tie_embeddings", 0),  # not a JSON boolean
]


@pytest.mark.parametrize("layout,field,value", BAD_NUMBERS, ids=[f"{f}={v!r}" for _, f, v in BAD_NUMBERS])
def test_numbers_that_are_not_positive_or_not_whole_are_refused_naming_the_field(layout, field, value):
    with pytest.raises(PretrainedError) as info:
        pretrained.config_from_json(with_field(layout, field, value))
    message = str(info.value)
    assert field in message and "\n" not in message


@pytest.mark.parametrize("layout,field,value", [
    ("transformers", "num_hidden_layers", 2.0), ("transformers", "hidden_size", 32.0),
    ("transformers", "expand", 2.0), ("transformers mamba1", "time_step_rank", 2.0),
    ("mamba_ssm", "n_layer", 2.0), ("mamba_ssm", "d_intermediate", 0.0), ("mamba_ssm", "ssm_cfg.d_state", 16.0),
])
def test_a_whole_float_is_the_integer(layout, field, value):
    """2.0 where 2 is meant loads the same ModelConfig, with integers in it (so "2.0 layers" cannot reach range())."""
    cfg, _ = pretrained.config_from_json(with_field(layout, field, value))
    assert cfg == pretrained.config_from_json(CONFIGS[layout])[0]
    assert all(type(getattr(cfg, name)) is int for name in ("d_model", "n_layer", "d_state", "expand", "vocab_size"))
