"""pretrained: the official Mamba-1 and Mamba-2 language models, and GLA, DeltaNet and Gated DeltaNet models in
flash-linear-attention's layout (pretrained/fla.py), loaded into this project's model.LM.

The paper's Figure 1 reads the official checkpoints (state-spaces/mamba-130m ... -2.8b for Mamba-1, panel (a);
state-spaces/mamba2-130m ... -2.7b for Mamba-2, panel (b); all trained on the Pile at T = 2048 tokens with the
GPT-NeoX-20B tokenizer) far beyond T. model.py's mixers are the official ones with the official parameter names, so
loading is little more than checking; once loaded, the explicit State, the interventions and the diagnostics of this
project apply to these models as to any other.

    model = load_pretrained("state-spaces/mamba2-370m")          # through huggingface_hub and its cache
    model = load_pretrained("path/to/folder", device="cuda")     # config.json + model.safetensors or pytorch_model.bin
    model.trained_on   # {"tokenizer", "tokenizer_sha256", "seq_len", "corpus", "source"}
    official_config("state-spaces/mamba2-2.7b")                  # its ModelConfig, offline: sizes, memory estimates

Three public layouts are read:
    mamba_ssm     config.json {d_model, n_layer, vocab_size, ssm_cfg: {layer: "Mamba2", ...}, ...} (no layer, or
                  "Mamba1": Mamba-1); tensors backbone.embedding.weight, backbone.layers.N.{norm.weight, mixer.*},
                  backbone.norm_f.weight and lm_head.weight (absent, or equal to the embedding, when tied). The
                  embedding has vocab_size rounded up to pad_vocab_size_multiple rows.
    transformers  config.json {model_type: "mamba2" or "mamba", hidden_size, num_hidden_layers, state_size, ...};
                  the same tensors except backbone.embeddings.weight; vocab_size is the number of rows; an output
                  layer of its own when tie_word_embeddings is false (transformers 5 writes that by default).
    fla           config.json {model_type: "gla", "delta_net" or "gated_deltanet", hidden_size, num_heads, ...};
                  tensors model.embeddings.weight, model.layers.N.{attn_norm, attn.*, mlp_norm, mlp.*}, ...:
                  pretrained/fla.py, which renames them and reads the sizes.
A config that asks for anything model.py does not compute (attention layers, an MLP, a clamp on dt, ...) is refused
in one line naming the field: a model loaded approximately would give wrong numbers without a sign. So is a size that
is not a positive whole number (2.0 is read as 2; 2.5, "32" and true are refused) or a rate that is not a positive
number (_number decides this for every numeric field). Weights are read without running code from the file
(safetensors, or torch.load(weights_only=True)). Every error is a PretrainedError (a runs.UsageError) with a one-line
message that the scripts print as it is.
"""
import hashlib
import json
import math
import os
import re

import torch

from model import ModelConfig
from runs import CheckpointError, UsageError, build

NEOX_TOKENIZER = "EleutherAI/gpt-neox-20b"
# The official language models, all trained at T = 2048 on the Pile with the GPT-NeoX-20B vocabulary of 50277 tokens:
# Mamba-2 (Dao & Gu, 2024): d_state 128, headdim 64, expand 2, one group, a width-4 convolution, 50288 embedding rows;
# Mamba-1 (Gu & Dao, 2023): d_state 16, expand 2, a width-4 convolution, dt_rank ceil(d_model / 16), 50280 rows.
OFFICIAL = {
    "state-spaces/mamba2-130m": dict(mixer="mamba2", d_model=768, n_layer=24),
    "state-spaces/mamba2-370m": dict(mixer="mamba2", d_model=1024, n_layer=48),
    "state-spaces/mamba2-780m": dict(mixer="mamba2", d_model=1536, n_layer=48),
    "state-spaces/mamba2-1.3b": dict(mixer="mamba2", d_model=2048, n_layer=48),
    "state-spaces/mamba2-2.7b": dict(mixer="mamba2", d_model=2560, n_layer=64),
    "state-spaces/mamba-130m": dict(mixer="mamba1", d_model=768, n_layer=24),
    "state-spaces/mamba-370m": dict(mixer="mamba1", d_model=1024, n_layer=48),
    "state-spaces/mamba-790m": dict(mixer="mamba1", d_model=1536, n_layer=48),
    "state-spaces/mamba-1.4b": dict(mixer="mamba1", d_model=2048, n_layer=48),
    "state-spaces/mamba-2.8b": dict(mixer="mamba1", d_model=2560, n_layer=64),
}
OFFICIAL_SHARED = {
    "mamba2": dict(vocab_size=50277, pad_vocab_multiple=16, d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1,
                   norm_eps=1e-5),
    "mamba1": dict(vocab_size=50277, pad_vocab_multiple=8, d_state=16, d_conv=4, expand=2, norm_eps=1e-5),
}
OFFICIAL_TRAINING = dict(tokenizer=NEOX_TOKENIZER, seq_len=2048, corpus="the Pile")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # the first one present is read
OVERRIDABLE = ("backend", "chunk_size")  # how the scan runs, not what it computes
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class PretrainedError(UsageError):
    """A checkpoint that cannot be loaded exactly; the message is one line saying why and what to do."""


def official_config(name, **overrides):
    """The ModelConfig of an official model, without downloading anything ("state-spaces/mamba2-370m" or
    "mamba2-370m"). Parameter count without allocating: with torch.device("meta"): LM(cfg).num_parameters()."""
    full = name if name in OFFICIAL else f"state-spaces/{name}"
    if full not in OFFICIAL:
        raise PretrainedError(f"unknown official model {name!r}; choose one of {', '.join(OFFICIAL)}")
    return ModelConfig(mlp=False, **OFFICIAL_SHARED[OFFICIAL[full]["mixer"]], **OFFICIAL[full], **overrides)


# ----------------------------------------------------------------------------------------------------------------
# config.json -> ModelConfig
# ----------------------------------------------------------------------------------------------------------------

INF = float("inf")
# field: (the library's default, the one value model.py computes, what any other value asks for)
MAMBA_SSM_FIXED = {
    "attn_layer_idx": ([], [], "attention layers"),
    "d_intermediate": (0, 0, "an MLP after each mixer"),
    "rms_norm": (True, True, "LayerNorm instead of RMSNorm"),
}
MAMBA2_FIXED = {  # inside ssm_cfg; the defaults of mamba_ssm's Mamba2 module
    "D_has_hdim": (False, False, "a skip weight D per channel instead of per head"),
    "rmsnorm": (True, True, "no gated RMSNorm before out_proj"),
    "norm_before_gate": (False, False, "the norm before the gate"),
    "dt_limit": ((0.0, INF), (0.0, INF), "dt clamped to a range"),
    "bias": (False, False, "biases in in_proj and out_proj"),
    "conv_bias": (True, True, "a convolution without bias"),
    "d_ssm": (None, None, "an SSM over part of the channels only"),
}
MAMBA1_FIXED = {  # inside ssm_cfg; the defaults of mamba_ssm's Mamba (Mamba-1) module
    "bias": (False, False, "biases in in_proj and out_proj"),
    "conv_bias": (True, True, "a convolution without bias"),
}
TRANSFORMERS_MAMBA1_FIXED = {  # defaults of transformers' MambaConfig
    "use_bias": (False, False, "biases in in_proj and out_proj"),
    "use_conv_bias": (True, True, "a convolution without bias"),
    "rms_norm": (True, True, "LayerNorm instead of RMSNorm"),
    "hidden_act": ("silu", "silu", "an activation other than silu"),
}
TRANSFORMERS_FIXED = {  # defaults of transformers' Mamba2Config
    "use_bias": (False, False, "biases in in_proj and out_proj"),
    "use_conv_bias": (True, True, "a convolution without bias"),
    "time_step_limit": ((0.0, INF), (0.0, INF), "dt clamped to a range"),
    "rms_norm": (True, True, "LayerNorm instead of RMSNorm"),
    "hidden_act": ("silu", "silu", "an activation other than silu"),
    "norm_before_gate": (False, False, "the norm before the gate"),
}
# Fields accepted with any value besides the ones above, because they do not change the function computed:
#   sizes, read into the ModelConfig; initialisation ranges (dt_min..., dt_init, dt_scale, A_init_range, conv_init,
#   initializer_range, rescale_prenorm_residual, time_step_*), which only matter before training; how the
#   computation runs (chunk_size: this project picks its own; use_mem_eff_path, use_fast_path, use_mambapy,
#   use_associative_scan, fused_add_norm; residual_in_fp32, precision only); attn_cfg, unused without attention
#   layers; time_step_rank, a Mamba-1 field the Mamba-2 mixer never reads (Mamba-1's must be ceil(d_model / 16));
#   and the bookkeeping that transformers writes (token ids, dtype, version, architectures, use_cache).
MAMBA_SSM_FIELDS = {"d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple", "ssm_cfg", "attn_cfg",
                    "residual_in_fp32", "fused_add_norm", "tie_embeddings", *MAMBA_SSM_FIXED}
MAMBA2_FIELDS = {"layer", "d_state", "d_conv", "expand", "headdim", "ngroups", "dt_min", "dt_max", "dt_init_floor",
                 "A_init_range", "conv_init", "chunk_size", "use_mem_eff_path", *MAMBA2_FIXED}
MAMBA1_FIELDS = {"layer", "d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init", "dt_scale",
                 "dt_init_floor", "use_fast_path", *MAMBA1_FIXED}
TRANSFORMERS_MAMBA1_FIELDS = {"model_type", "hidden_size", "num_hidden_layers", "n_layer", "vocab_size", "state_size",
                              "conv_kernel", "expand", "intermediate_size", "layer_norm_epsilon", "time_step_rank",
                              "time_step_scale", "time_step_min", "time_step_max", "time_step_init_scheme",
                              "time_step_floor", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple",
                              "initializer_range", "rescale_prenorm_residual", "use_cache", "use_mambapy",
                              "use_associative_scan",
                              "bos_token_id", "eos_token_id", "pad_token_id", "architectures", "torch_dtype", "dtype",
                              "transformers_version", "_name_or_path", "tie_word_embeddings",
                              *TRANSFORMERS_MAMBA1_FIXED}
TRANSFORMERS_FIELDS = {"model_type", "hidden_size", "num_hidden_layers", "vocab_size", "state_size", "head_dim",
                       "num_heads", "n_groups", "conv_kernel", "expand", "layer_norm_epsilon", "time_step_min",
                       "time_step_max", "time_step_floor", "time_step_rank", "chunk_size", "residual_in_fp32",
                       "initializer_range", "rescale_prenorm_residual", "use_cache", "bos_token_id", "eos_token_id",
                       "pad_token_id", "architectures", "torch_dtype", "dtype", "transformers_version",
                       "_name_or_path", "tie_word_embeddings", *TRANSFORMERS_FIXED}


def _float(value):
    """A number as config.json writes it: plain, or as transformers 5 encodes infinities, {"__float__": "Infinity"}."""
    return float(value["__float__"] if isinstance(value, dict) else value)


def _number(value, field, whole=True):
    """A size (whole=True) or a rate read from config.json: a positive finite number, and for a size a whole one.
    2.0 is the size 2 (a converter that computed the sizes in floating point writes that, and it means nothing
    else); 2.5, "32", true, null, 0 and negative numbers are refused in one line naming the field, before they
    reach arithmetic ("32" * 2 is "3232") or ModelConfig (true is the integer 1 to Python)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and value > 0 and (not whole or value == int(value))):
        wanted = "a positive whole number" if whole else "a positive number"
        raise PretrainedError(f"config.json: {field}={json.dumps(value)} must be {wanted}")
    if whole and value > MAX_SIZE:  # 1e20 would overflow torch's sizes before any memory check could refuse it
        raise PretrainedError(f"config.json: {field}={json.dumps(value)} is beyond any model (at most {MAX_SIZE:,})")
    return int(value) if whole else float(value)


MAX_SIZE = 2 ** 24  # vocabularies of 256k and widths of 16k stay far below; the memory check sees the products


def _switch(section, name, default):
    """A true/false field of config.json: a JSON boolean, nothing else ("false" is a true value to Python)."""
    value = section.get(name, default)
    if not isinstance(value, bool):
        raise PretrainedError(f"config.json: {name}={json.dumps(value)} must be true or false")
    return value


def _field(section, name, default, prefix="", whole=True):
    """_number of section[name], or of default when config.json leaves the field out; prefix says where the
    section is (ssm_cfg.)."""
    return _number(section.get(name, default), prefix + name, whole)


def _same(value, wanted):
    """Config values compare as JSON gives them: [0.0, Infinity] and [0.0, {"__float__": "Infinity"}] equal
    (0.0, inf), "swish" is silu, 0.0 is 0."""
    if isinstance(wanted, int) and not isinstance(wanted, bool):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == wanted
    if isinstance(wanted, tuple):
        try:
            return tuple(_float(v) for v in value) == wanted
        except (TypeError, ValueError, KeyError):
            return False
    if wanted == "silu":
        return value in ("silu", "swish")
    return value == wanted and type(value) is type(wanted)


def _check_fields(config, known, fixed, prefix=""):
    """Refuse unknown fields and fields whose value model.py does not compute (one line naming the field)."""
    for key in config:
        if key not in known:
            raise PretrainedError(f"config.json: unknown field {prefix}{key}; it may change the model, so it is "
                                  f"not loaded")
    for key, (default, wanted, meaning) in fixed.items():
        value = config.get(key, default)
        if not _same(value, wanted):
            raise PretrainedError(f"config.json: {prefix}{key}={json.dumps(value)} asks for {meaning}, which "
                                  f"model.py does not implement")


def _from_mamba_ssm(config):
    """ModelConfig keyword arguments from the mamba_ssm layout (defaults: MambaConfig and the Mamba2 module)."""
    _check_fields(config, MAMBA_SSM_FIELDS, MAMBA_SSM_FIXED)
    ssm = config.get("ssm_cfg") or {}
    if not isinstance(ssm, dict):
        raise PretrainedError("config.json: ssm_cfg must be a JSON object")
    layer = ssm.get("layer", "Mamba1")  # mamba_ssm's default: the Mamba-1 checkpoints' ssm_cfg is empty
    if layer == "Mamba1":
        return _mamba1_from_mamba_ssm(config, ssm)
    if layer != "Mamba2":
        raise PretrainedError(f"config.json: ssm_cfg.layer={json.dumps(layer)} is not implemented (only Mamba1 and "
                              f"Mamba2)")
    d_model, expand = _field(config, "d_model", 2560), _field(ssm, "expand", 2, "ssm_cfg.")
    if ssm.get("d_ssm") == expand * d_model:  # the whole width, which is what None means
        ssm = {k: v for k, v in ssm.items() if k != "d_ssm"}
    _check_fields(ssm, MAMBA2_FIELDS, MAMBA2_FIXED, prefix="ssm_cfg.")
    return dict(mixer="mamba2", d_model=d_model, expand=expand, **_mamba_ssm_sizes(config),
                **_mamba_ssm_mixer(ssm, d_state=128), headdim=_field(ssm, "headdim", 64, "ssm_cfg."),
                ngroups=_field(ssm, "ngroups", 1, "ssm_cfg."), A_init_range=_init_range(ssm))


def _mamba_ssm_sizes(config):
    """The language model's fields of a mamba_ssm config.json besides d_model (Mamba-1 and Mamba-2 alike)."""
    return dict(vocab_size=_field(config, "vocab_size", 50277),
                pad_vocab_multiple=_field(config, "pad_vocab_size_multiple", 8), n_layer=_field(config, "n_layer", 64),
                norm_eps=1e-5,  # mamba_ssm's block norms and Mamba-2's gated norm all use 1e-5
                tie_embeddings=_switch(config, "tie_embeddings", True))


def _mamba_ssm_mixer(ssm, d_state):
    """The ssm_cfg fields that Mamba-1 and Mamba-2 share (d_state: the module's default)."""
    return dict(d_state=_field(ssm, "d_state", d_state, "ssm_cfg."), d_conv=_field(ssm, "d_conv", 4, "ssm_cfg."),
                **{name: _field(ssm, name, default, "ssm_cfg.", whole=False)
                   for name, default in (("dt_min", 0.001), ("dt_max", 0.1), ("dt_init_floor", 1e-4))})


def _init_range(ssm):
    """Mamba-2's A_init_range: two positive numbers."""
    value = ssm.get("A_init_range", [1, 16])
    if not isinstance(value, list) or len(value) != 2:
        raise PretrainedError(f"config.json: ssm_cfg.A_init_range={json.dumps(value)} must be two positive numbers")
    return tuple(_number(x, "ssm_cfg.A_init_range", whole=False) for x in value)


def _dt_rank(value, d_model, field):
    """Mamba-1's dt_rank: "auto" is ceil(d_model / 16), the only one model.py computes."""
    if value != "auto" and _number(value, field) != math.ceil(d_model / 16):
        raise PretrainedError(f"config.json: {field}={json.dumps(value)} asks for a dt rank other than "
                              f"ceil(d_model / 16) = {math.ceil(d_model / 16)}, which model.py does not implement")


def _mamba1_from_mamba_ssm(config, ssm):
    """ModelConfig keyword arguments of a Mamba-1 model in mamba_ssm's layout (defaults: its Mamba module)."""
    _check_fields(ssm, MAMBA1_FIELDS, MAMBA1_FIXED, prefix="ssm_cfg.")
    d_model = _field(config, "d_model", 2560)
    _dt_rank(ssm.get("dt_rank", "auto"), d_model, "ssm_cfg.dt_rank")
    return dict(mixer="mamba1", d_model=d_model, expand=_field(ssm, "expand", 2, "ssm_cfg."),
                **_mamba_ssm_sizes(config), **_mamba_ssm_mixer(ssm, d_state=16))


def _mamba1_from_transformers(config):
    """ModelConfig keyword arguments of transformers' MambaForCausalLM (defaults: its MambaConfig)."""
    _check_fields(config, TRANSFORMERS_MAMBA1_FIELDS, TRANSFORMERS_MAMBA1_FIXED)
    hidden, expand = _field(config, "hidden_size", 768), _field(config, "expand", 2)
    layers = _field(config, "num_hidden_layers", 32)
    _dt_rank(config.get("time_step_rank", "auto"), hidden, "time_step_rank")
    for field, wanted in (("intermediate_size", expand * hidden), ("n_layer", layers)):
        if field in config and _field(config, field, None) != wanted:
            raise PretrainedError(f"config.json: {field}={json.dumps(config[field])} contradicts the other sizes "
                                  f"({wanted})")
    return dict(mixer="mamba1", vocab_size=_field(config, "vocab_size", 50280), pad_vocab_multiple=1,
                d_model=hidden, n_layer=layers, expand=expand, d_state=_field(config, "state_size", 16),
                **_transformers_mixer(config), tie_embeddings=_switch(config, "tie_word_embeddings", True))


def _transformers_mixer(config):
    """The fields that transformers' MambaConfig and Mamba2Config share, with the same defaults."""
    rates = {name: _field(config, field, default, whole=False) for name, field, default in (
        ("dt_min", "time_step_min", 0.001), ("dt_max", "time_step_max", 0.1),
        ("dt_init_floor", "time_step_floor", 1e-4), ("norm_eps", "layer_norm_epsilon", 1e-5))}
    return dict(d_conv=_field(config, "conv_kernel", 4), **rates)


def _from_transformers(config):
    """ModelConfig keyword arguments from the transformers layout (defaults: transformers' Mamba2Config).

    With n_groups > 1 the gated norm is taken per group, as mamba_ssm and transformers compute it (the pure-torch
    path of transformers 4 normalised over all channels at once; tests/test_transformers.py compares with 5.25)."""
    if config.get("model_type") == "mamba":
        return _mamba1_from_transformers(config)
    if config.get("model_type") != "mamba2":
        raise PretrainedError(f"config.json: model_type={json.dumps(config.get('model_type'))} is not "
                              f"implemented (only mamba and mamba2)")
    _check_fields(config, TRANSFORMERS_FIELDS, TRANSFORMERS_FIXED)
    hidden, expand = _field(config, "hidden_size", 4096), _field(config, "expand", 2)
    heads, head_dim = _field(config, "num_heads", 128), _field(config, "head_dim", 64)
    if heads * head_dim != expand * hidden:
        raise PretrainedError(f"config.json: num_heads * head_dim = {heads * head_dim} differs from expand * "
                              f"hidden_size = {expand * hidden}")
    return dict(mixer="mamba2", vocab_size=_field(config, "vocab_size", 32768), pad_vocab_multiple=1,  # rows = vocab
                d_model=hidden, n_layer=_field(config, "num_hidden_layers", 64), expand=expand, headdim=head_dim,
                d_state=_field(config, "state_size", 128), ngroups=_field(config, "n_groups", 8),
                **_transformers_mixer(config), tie_embeddings=_switch(config, "tie_word_embeddings", False))


def config_from_json(config, **overrides):
    """(ModelConfig, layout) from the contents of a config.json in either layout; overrides: backend, chunk_size."""
    if not isinstance(config, dict):
        raise PretrainedError("config.json: expected a JSON object")
    for key in overrides:
        if key not in OVERRIDABLE:
            raise PretrainedError(f"cannot override {key}: it would change the pretrained model; only "
                                  f"{', '.join(OVERRIDABLE)} can be set")
    from pretrained import fla  # GLA, DeltaNet and Gated DeltaNet in flash-linear-attention's layout

    if config.get("model_type") in fla.MIXER_OF:
        layout, read = "fla", fla.config_kwargs
    elif "model_type" in config:
        layout, read = "transformers", _from_transformers
    elif "d_model" in config or "ssm_cfg" in config:
        layout, read = "mamba_ssm", _from_mamba_ssm
    else:
        raise PretrainedError("config.json: neither the mamba_ssm layout (d_model, n_layer, ssm_cfg) nor the "
                              "transformers or flash-linear-attention one (model_type)")
    try:  # values of the wrong type end here too
        return ModelConfig(**{"mlp": False, **read(config)}, **overrides), layout  # (fla's models have an MLP)
    except (TypeError, ValueError) as e:
        raise PretrainedError(f"config.json: {_one_line(e)}") from None


def official_name_of(cfg):
    """The official model whose architecture cfg is, or None. A folder holding one of them (downloaded elsewhere,
    or converted to the transformers layout) is taken to hold that model."""
    def arch(c):
        return (c.mixer, c.d_model, c.n_layer, c.d_state, c.d_conv, c.expand, c.norm_eps, c.padded_vocab_size,
                *((c.headdim, c.ngroups) if c.mixer == "mamba2" else ()))
    return next((name for name in OFFICIAL if arch(official_config(name)) == arch(cfg)), None)


# ----------------------------------------------------------------------------------------------------------------
# Files: a local folder or the Hugging Face Hub
# ----------------------------------------------------------------------------------------------------------------

def _one_line(error):
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def _folder_files(folder):
    """{"config", "weights", "tokenizer"} paths in a local folder (tokenizer None when it has no tokenizer.json)."""
    config = os.path.join(folder, "config.json")
    if not os.path.isfile(config):
        raise PretrainedError(f"{folder} has no config.json")
    weights = next((os.path.join(folder, f) for f in WEIGHT_FILES if os.path.isfile(os.path.join(folder, f))), None)
    if weights is None:
        raise PretrainedError(f"{folder} has no weight file ({' or '.join(WEIGHT_FILES)})")
    tokenizer = os.path.join(folder, "tokenizer.json")
    return dict(config=config, weights=weights, tokenizer=tokenizer if os.path.isfile(tokenizer) else None)


def _hub_files(repo):
    """The same paths for a Hugging Face Hub model, downloaded into (or found in) huggingface_hub's cache, which
    resumes interrupted downloads and uses the token of `hf auth login` or HF_TOKEN for gated models."""
    try:
        from huggingface_hub import errors, hf_hub_download
    except ImportError:
        raise PretrainedError(f"downloading {repo} needs huggingface_hub: pip install huggingface_hub (or pass a "
                              f"local folder)") from None

    def fetch(filename):
        """The local path of filename; None when the repository has no such file; ConnectionError when neither
        the Hub nor the cache can give it."""
        try:
            return hf_hub_download(repo, filename)
        except errors.GatedRepoError:
            raise PretrainedError(f"{repo} is gated: accept its terms on huggingface.co, then run `hf auth login` "
                                  f"or set HF_TOKEN") from None
        except errors.RepositoryNotFoundError:
            raise PretrainedError(f"{repo} is neither a folder here nor a model on the Hugging Face Hub (a private "
                                  f"one needs HF_TOKEN)") from None
        except errors.LocalEntryNotFoundError as e:  # offline, and not in the cache
            raise ConnectionError(str(e)) from None
        except errors.EntryNotFoundError:
            return None
        except errors.HFValidationError:
            raise PretrainedError(f"{repo} is neither a folder here nor a Hugging Face Hub name") from None
        except OSError as e:  # network and HTTP errors
            raise ConnectionError(str(e)) from None

    try:
        config = fetch("config.json")
        if config is None:
            raise PretrainedError(f"{repo} on the Hugging Face Hub has no config.json")
        weights, offline = None, None
        for filename in WEIGHT_FILES:  # offline, a later file may still be in the cache
            try:
                weights = fetch(filename)
            except ConnectionError as e:
                offline = e
            if weights is not None:
                break
        if weights is None:
            if offline is not None:
                raise offline
            raise PretrainedError(f"{repo} on the Hugging Face Hub has no {' or '.join(WEIGHT_FILES)}")
    except ConnectionError:
        raise PretrainedError(f"could not download {repo} (offline?), and there is no folder {repo} here: download "
                              f"config.json and pytorch_model.bin (or model.safetensors) elsewhere and give their "
                              f"folder; offline, HF_HUB_OFFLINE=1 stops the waiting for the network") from None
    try:
        tokenizer = fetch("tokenizer.json")  # the official models have none; a converted copy may
    except ConnectionError:
        tokenizer = None
    return dict(config=config, weights=weights, tokenizer=tokenizer)


def _locate(name_or_folder):
    """(files, source): a local folder when one exists, else a Hugging Face Hub name."""
    path = os.path.expanduser(str(name_or_folder))
    if os.path.isdir(path):
        return _folder_files(path), os.path.abspath(path)
    if os.path.exists(path):
        raise PretrainedError(f"{path} is a file; pass the folder holding config.json and the weights")
    if not HUB_NAME.fullmatch(path):
        raise PretrainedError(f"no folder {path} (a Hugging Face Hub name looks like state-spaces/mamba2-370m)")
    return _hub_files(path), path


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise PretrainedError(f"cannot read {path}: {_one_line(e)}") from None


def read_weights(path):
    """name -> tensor from a .safetensors file or a pickled state dict, without running code from the file."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise PretrainedError(f"reading {path} needs safetensors: pip install safetensors") from None
    except Exception as e:  # a truncated or corrupt file raises many kinds of error
        raise PretrainedError(f"cannot read {path} (truncated or corrupt? download it again): "
                              f"{_one_line(e)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedError(f"{path} does not hold a state dict of tensors")
    return state


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Weights -> LM
# ----------------------------------------------------------------------------------------------------------------

def _official_names(state, layout, tied):
    """The tensors under model.LM's names: transformers calls the embedding backbone.embeddings. With a tied output
    layer (tied: what config.json says) a missing lm_head.weight is the embedding, and a different one is
    refused: the official libraries would ignore it."""
    state = dict(state)
    if layout == "transformers" and "backbone.embeddings.weight" in state:
        state["backbone.embedding.weight"] = state.pop("backbone.embeddings.weight")
    embedding = state.get("backbone.embedding.weight")
    if tied and embedding is not None:
        head = state.setdefault("lm_head.weight", embedding)
        if head.shape != embedding.shape or not torch.equal(head, embedding):
            raise PretrainedError("lm_head.weight differs from the embedding, but config.json says the output layer "
                                  "is the embedding (tied); the official code would ignore it, so it is not loaded")
    return state


def is_tied(state):
    """Whether the output layer is a copy of the embedding (transformers 5 saves untied models by default, often
    with such a copy): then the tied model computes the same function."""
    head, embedding = state.get("lm_head.weight"), state.get("backbone.embedding.weight")
    return head is not None and embedding is not None and head.shape == embedding.shape and torch.equal(head,
                                                                                                         embedding)


def _trained_on(source, official, layout, vocab_size, tokenizer_file):
    """What the model was trained with, as far as the files say. The official models: the GPT-NeoX-20B tokenizer,
    T = 2048, the Pile. Otherwise a tokenizer.json beside the weights names the tokenizer (path and sha256 of its
    bytes); a mamba_ssm model with vocab_size 50277 has the GPT-NeoX-20B vocabulary; the rest is unknown (None)."""
    training = dict(OFFICIAL_TRAINING) if official else dict(tokenizer=None, seq_len=None, corpus=None)
    if layout == "mamba_ssm" and vocab_size == OFFICIAL_SHARED["mamba2"]["vocab_size"]:  # (Mamba-1's too)
        training["tokenizer"] = NEOX_TOKENIZER
    training["tokenizer_sha256"] = None
    if tokenizer_file is not None:
        training["tokenizer"] = os.path.abspath(tokenizer_file)
        training["tokenizer_sha256"] = _sha256(tokenizer_file)
    training["source"] = source
    return training


def load_pretrained(name_or_folder, device="cpu", **overrides):
    """A pretrained language model as a model.LM in eval mode, float32, on device.

    name_or_folder: a folder holding config.json and model.safetensors or pytorch_model.bin (and optionally
    tokenizer.json), or a Hugging Face Hub name such as "state-spaces/mamba2-370m". overrides: backend, chunk_size
    (how the scan runs; None keeps the default). The model gets an attribute trained_on (see _trained_on).
    Raises PretrainedError."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    files, source = _locate(name_or_folder)
    cfg, layout = config_from_json(_read_json(files["config"]), **overrides)
    state = read_weights(files["weights"])
    if layout == "fla":
        from pretrained import fla

        state = fla.lm_names(state)
    state = _official_names(state, layout, cfg.tie_embeddings)
    cfg.tie_embeddings = cfg.tie_embeddings or is_tied(state)
    official = official_name_of(cfg) if cfg.tie_embeddings else None
    vocab_size = cfg.vocab_size
    if official is not None:  # the same model in both layouts: logits over the real tokens only
        cfg = official_config(official, **overrides)
    try:
        model = build(cfg, state, where=files["weights"])
    except CheckpointError as error:
        raise PretrainedError(str(error)) from None
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError, ValueError) as e:
        raise PretrainedError(f"cannot move the model to {device}: {_one_line(e)}") from None
    model.trained_on = _trained_on(source, official, layout, vocab_size, files["tokenizer"])
    if layout == "fla":
        model.trained_on.update(fla.training_of(source))
    return model.eval()
