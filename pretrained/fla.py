"""pretrained/fla.py: GLA, DeltaNet and Gated DeltaNet language models in flash-linear-attention's layout.

flash-linear-attention (fla, github.com/fla-org/flash-linear-attention) publishes linear-recurrent language models
as Hugging Face folders: fla-hub/gla-1.3B-100B, fla-hub/delta_net-1.3B-100B, linear-moe-hub/Gated-Deltanet-340M and
-1.3B among them. Their blocks are model.LM's (pre-norm, a mixer, a SwiGLU MLP, a final norm) and their mixers are
model.py's GatedLinearAttention and delta_rule/mixers.py's DeltaNet and GatedDeltaNet, which carry fla's parameter
names; loading renames the blocks' tensors and reads the sizes out of config.json, nothing more.

    config.json  {"model_type": "gla" | "delta_net" | "gated_deltanet", "hidden_size", "num_hidden_layers",
                  "num_heads", "vocab_size", ...}: the fields of fla's GLAConfig, DeltaNetConfig and
                  GatedDeltaNetConfig (fla/models/*/configuration_*.py)
    tensors      model.embeddings.weight, model.layers.N.{attn_norm, attn.*, mlp_norm, mlp.*}, model.norm.weight,
                 lm_head.weight (absent, or equal to the embedding, when tie_word_embeddings)

Two generations of the files exist, and both load. Before fla's commit b48ca31 (February 2025) the MLP had one
gate_proj of 2 I rows, its first half the gate and its second the value (GLAMLP, GatedDeltaNetMLP of 2024); since,
separate gate_proj and up_proj of I rows each. Gated DeltaNet files of fla before commit 834989c (March 2025), such
as linear-moe-hub's, hold a per-head attn.D that fla's layer created but never read ("Remove redundant parameter"):
it is dropped. GLA's output norm is g_norm_swish_gate when fuse_norm is true and g_norm otherwise: the same norm and
gate, fused or not. The embedding was model.embed_tokens in GLA's first weeks (February 2024).

Exactly what fla computes, or refused: a config field that asks for anything the mixers do not compute (attention
layers mixed in, no short convolution, feature maps, beta in [0, 2], grouped key or value heads, a clamp on GLA's
gate, ...) is refused in one line naming it (PretrainedError). Fields that do not change the function are accepted
whatever their value: which kernel runs (attn_mode, chunk_size, fuse_*), initialisation (initializer_range),
bookkeeping (token ids, dtype, versions), max_position_embeddings (no position enters these models), and use_l2warp
(a training-only gradient on the largest logit; post-training here does not add it). Differences in the arithmetic:
q and k are normalised as fla's l2norm does now, x / sqrt(||x||^2 + 1e-6) (fla's layers of 2024 used F.normalize:
the same unless ||x||^2 is near 1e-6), and everything runs in float32 where fla's kernels read bfloat16 inputs.
"""
import json

import torch

from model import ModelConfig
from pretrained import PretrainedError, _check_fields, _field, _number, _switch

MIXER_OF = {"gla": "gla", "delta_net": "deltanet", "gated_deltanet": "gated_deltanet"}  # model_type -> --mixer

# Accepted whatever their value (see above), in every model type.
HARMLESS = {"model_type", "architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
            "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "initializer_range",
            "max_position_embeddings", "attn_mode", "chunk_size", "fuse_cross_entropy", "fuse_linear_cross_entropy",
            "fuse_norm", "fuse_swiglu", "use_l2warp"}
SIZES = {"hidden_size", "num_hidden_layers", "vocab_size", "num_heads", "norm_eps", "rms_norm_eps", "hidden_ratio",
         "intermediate_size", "tie_word_embeddings", "conv_size"}
# field: (fla's default, the one value this project computes, what any other value asks for)
BLOCK_FIXED = {
    "attn": (None, None, "attention layers mixed in"),
    "hidden_act": ("swish", "silu", "an activation other than swish"),
    "norm_first": (False, False, "norms inside the mixer and the MLP instead of before them"),
    "attnres_block_size": (None, None, "attention over earlier blocks' outputs"),
}
GLA_FIXED = {  # GLAConfig and the GatedLinearAttention layer
    "feature_map": (None, None, "a feature map on q and k"),
    "use_short_conv": (False, False, "short convolutions before q, k and v"),
    "use_output_gate": (True, True, "no output gate"),
    "clamp_min": (None, None, "a floor on the gate's log"),
    "elementwise_affine": (True, True, "an output norm without weight"),
    "use_gk": (True, True, "no forget gate"),
    "use_gv": (False, False, "a forget gate on the values"),
}
DELTA_FIXED = {  # DeltaNetConfig and GatedDeltaNetConfig, with the fields of their 2024 versions
    "use_short_conv": (True, True, "no short convolutions"),
    "conv_bias": (False, False, "biases in the short convolutions"),
    "share_conv_kernel": (False, False, "one convolution of the input instead of one each for q, k and v"),
    "allow_neg_eigval": (False, False, "beta in [0, 2] (negative eigenvalues)"),
    "use_rope": (False, False, "rotary position embeddings"),
}
DELTANET_FIXED = {
    **DELTA_FIXED,
    "use_gate": (False, False, "an output gate, which deltanet does not have (gated_deltanet does)"),
    "use_beta": (True, True, "beta fixed at 1"),
    "use_output_norm": (True, True, "no norm of the output"),
    "qk_norm": ("l2", "l2", "q and k normalised otherwise than by their L2 norm"),
    "qk_activation": ("silu", "silu", "q and k activated otherwise than by silu"),
}
GATED_DELTANET_FIXED = {**DELTA_FIXED, "use_gate": (True, True, "no output gate")}
FIXED = {"gla": GLA_FIXED, "delta_net": DELTANET_FIXED, "gated_deltanet": GATED_DELTANET_FIXED}
KNOWN = {"gla": {"expand_k", "expand_v", "num_kv_heads", "share_conv_kernel"},  # (no convolution to share)
         "delta_net": {"expand_k", "expand_v"},
         "gated_deltanet": {"head_dim", "expand_v", "num_v_heads"}}
# fla's defaults where config.json leaves a field out (fla/models/*/configuration_*.py)
DEFAULTS = {"gla": dict(num_hidden_layers=24, num_heads=4, expand_k=0.5, expand_v=1.0),
            "delta_net": dict(num_hidden_layers=24, num_heads=16, expand_k=1.0, expand_v=1.0),
            "gated_deltanet": dict(num_hidden_layers=21, num_heads=6, head_dim=256, expand_v=2.0)}

# The public checkpoints' config.json as far as it is known here. No copy of these files was at hand, so each comes
# from fla's configuration class of the time (its defaults) and the tensors that others report finding in the file;
# the loader itself reads the real config.json, these serve estimates made before downloading (sizes, memory).
PUBLIC = {
    # GLAConfig's defaults (fla, 2024-2025): 1.37B parameters, the size in the name; not checked against the file.
    "fla-hub/gla-1.3B-100B": dict(model_type="gla", hidden_size=2048, num_hidden_layers=24, num_heads=4,
                                  expand_k=0.5, expand_v=1, hidden_ratio=4, vocab_size=32000, norm_eps=1e-6,
                                  tie_word_embeddings=False),
    # DeltaNetConfig (fla v0.3.0, July 2025, which is reported to load the file strictly: 339 tensors, 1,365,677,056
    # parameters, untied); 16 heads, expand_k = expand_v = 1 and no output gate are the only sizes giving that count.
    "fla-hub/delta_net-1.3B-100B": dict(model_type="delta_net", hidden_size=2048, num_hidden_layers=24,
                                        num_heads=16, expand_k=1, expand_v=1, use_gate=False, hidden_ratio=4,
                                        vocab_size=32000, norm_eps=1e-6, tie_word_embeddings=False),
    # GatedDeltaNetConfig of fla's commit bcd9e79 (December 2024), whose names and shapes the file is reported to
    # match: 435 tensors, 366,763,296 parameters once the tied output layer is counted once; 24 layers of 4 heads of
    # 256 with expand_v = 1 are the sizes giving that count.
    "linear-moe-hub/Gated-Deltanet-340M": dict(model_type="gated_deltanet", hidden_size=1024, num_hidden_layers=24,
                                               num_heads=4, head_dim=256, expand_v=1, hidden_ratio=4,
                                               vocab_size=32000, norm_eps=1e-6, tie_word_embeddings=True),
}  # linear-moe-hub/Gated-Deltanet-1.3B: reported to have 4 heads; its other sizes are not known here

# What the model cards say the public checkpoints were trained on: fla-hub/gla-1.3B-100B's names its dataset,
# cerebras/SlimPajama-627B (100B tokens by its name). No training length is given in the cards or the configs seen
# here: eval.py then asks for --train_len. linear-moe-hub's folders hold no tokenizer (others report using Mistral's
# vocabulary of 32000 with them, which vocab_size 32000, bos 1 and eos 2 agree with).
CORPUS = {"fla-hub/gla-1.3B-100B": "SlimPajama-627B (100B tokens)"}


def config_kwargs(config):
    """ModelConfig keyword arguments of an fla config.json (model_type gla, delta_net or gated_deltanet)."""
    kind = config.get("model_type")
    fixed = {**BLOCK_FIXED, **FIXED[kind]}
    _check_fields(config, HARMLESS | SIZES | KNOWN[kind] | set(fixed), fixed)
    d_model = _field(config, "hidden_size", 2048)
    heads = _field(config, "num_heads", DEFAULTS[kind]["num_heads"])
    kwargs = dict(mixer=MIXER_OF[kind], vocab_size=_field(config, "vocab_size", 32000), pad_vocab_multiple=1,
                  d_model=d_model, n_layer=_field(config, "num_hidden_layers", DEFAULTS[kind]["num_hidden_layers"]),
                  n_heads=heads, mlp=True, mlp_hidden=_mlp_hidden(config, d_model), norm_eps=_norm_eps(config),
                  tie_embeddings=_switch(config, "tie_word_embeddings", False))
    if kind == "gated_deltanet":  # sizes per head: key head_dim, value head_dim * expand_v
        _same_heads(config, "num_v_heads", heads)
        head_dim = _field(config, "head_dim", DEFAULTS[kind]["head_dim"])
        head_v_dim = head_dim * _field(config, "expand_v", DEFAULTS[kind]["expand_v"], whole=False)
        kwargs.update(expand_k=heads * head_dim / d_model, expand_v=heads * head_v_dim / d_model)
    else:  # widths relative to hidden_size, as model.py's
        kwargs.update({name: _field(config, name, DEFAULTS[kind][name], whole=False) for name in ("expand_k",
                                                                                                   "expand_v")})
    if kind == "gla":  # fla's GLA layer: a gate of rank 16, logsigmoid / 16 (gate_logit_normalizer)
        _same_heads(config, "num_kv_heads", heads)
        kwargs.update(gate="channel", gate_temperature=16.0)
    else:
        kwargs.update(d_conv=_field(config, "conv_size", 4))
    return kwargs


def _same_heads(config, field, heads):
    """num_kv_heads (GLA) and num_v_heads (Gated DeltaNet): null, or num_heads; other values group the heads."""
    value = config.get(field)
    if value is not None and _number(value, field) != heads:
        raise PretrainedError(f"config.json: {field}={json.dumps(value)} asks for heads grouped differently from "
                              f"num_heads = {heads}, which model.py does not implement")


def _norm_eps(config):
    """norm_eps, called rms_norm_eps in fla's configurations of 2024 (one of them, or both agreeing); default 1e-6."""
    named = {name: _field(config, name, None, whole=False) for name in ("norm_eps", "rms_norm_eps") if name in config}
    if len(set(named.values())) > 1:
        raise PretrainedError(f"config.json: norm_eps and rms_norm_eps differ ({named['norm_eps']} and "
                              f"{named['rms_norm_eps']}); fla reads only one of them, so the model is unclear")
    return next(iter(named.values()), 1e-6)


def _mlp_hidden(config, d_model):
    """fla's GatedMLP width: intermediate_size, or hidden_ratio (default 4) * 2/3 * hidden_size rounded up to 256."""
    if config.get("intermediate_size") is not None:
        return _field(config, "intermediate_size", None)
    ratio = 4 if config.get("hidden_ratio") is None else _field(config, "hidden_ratio", None, whole=False)
    width = int(d_model * ratio * 2 / 3)
    return 256 * ((width + 255) // 256)


# ----------------------------------------------------------------------------------------------------------------
# fla's tensor names -> model.LM's
# ----------------------------------------------------------------------------------------------------------------

OUTSIDE_LAYERS = {"model.embeddings.weight": "backbone.embedding.weight",
                  "model.embed_tokens.weight": "backbone.embedding.weight",
                  "model.norm.weight": "backbone.norm_f.weight", "lm_head.weight": "lm_head.weight"}
IN_LAYER = {"attn_norm.": "norm.", "mlp_norm.": "norm2.", "attn.": "mixer.", "mlp.down_proj.": "mlp.fc2."}


def lm_names(state):
    """The tensors of an fla file under model.LM's names. The MLP's gate and value projections become fc1, the value
    rows first (SwiGLU computes fc2(a * silu(gate)) with (a, gate) = fc1(x)); attn.D is dropped (see above)."""
    renamed, mlp_inputs = {}, {}
    for name, tensor in state.items():
        parts = name.split(".")
        if name in OUTSIDE_LAYERS:
            renamed[OUTSIDE_LAYERS[name]] = tensor
        elif name.startswith("model.layers.") and len(parts) > 3:
            layer, inner = ".".join(parts[:3]), ".".join(parts[3:])
            if inner in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                mlp_inputs.setdefault(layer, {})[parts[4]] = tensor
            elif inner != "attn.D":
                inner = inner.replace("attn.g_norm_swish_gate.", "attn.g_norm.")
                prefix = next((p for p in IN_LAYER if inner.startswith(p)), None)
                if prefix is None:
                    raise PretrainedError(f"unexpected tensor {name} (an fla block holds attn_norm, attn, mlp_norm "
                                          f"and mlp)")
                renamed[f"backbone.{layer[len('model.'):]}.{IN_LAYER[prefix]}{inner[len(prefix):]}"] = tensor
        else:
            raise PretrainedError(f"unexpected tensor {name} (fla's language models hold model.embeddings, "
                                  f"model.layers, model.norm and lm_head)")
    for layer, inputs in mlp_inputs.items():
        renamed[f"backbone.{layer[len('model.'):]}.mlp.fc1.weight"] = _fc1(layer, inputs)
    return renamed


def _fc1(layer, inputs):
    """SwiGLU's fc1 = [up; gate] from separate gate_proj and up_proj, or from 2024's gate_proj = [gate; up]."""
    gate, up = inputs.get("gate_proj"), inputs.get("up_proj")
    if gate is None:
        raise PretrainedError(f"{layer}.mlp.up_proj.weight without {layer}.mlp.gate_proj.weight")
    if up is None:  # one projection of 2 I rows: the gate, then the value
        if gate.dim() != 2 or gate.shape[0] % 2:
            raise PretrainedError(f"{layer}.mlp.gate_proj.weight has shape {tuple(gate.shape)}: without up_proj "
                                  f"it must hold an even number of rows (gate and value)")
        gate, up = gate.chunk(2)
    if gate.shape != up.shape:
        raise PretrainedError(f"{layer}.mlp.gate_proj.weight and up_proj.weight differ in shape ({tuple(gate.shape)} "
                              f"and {tuple(up.shape)})")
    return torch.cat([up, gate])


def training_of(source):
    """What the files do not say about a public checkpoint's training: {"corpus"} where its model card names it."""
    return {"corpus": CORPUS[source]} if source in CORPUS else {}


def public_config(name, **overrides):
    """The ModelConfig of a public checkpoint in PUBLIC, without downloading it. Parameter count without
    allocating: with torch.device("meta"): LM(cfg).num_parameters()."""
    if name not in PUBLIC:
        raise PretrainedError(f"no configuration known for {name!r}; known: {', '.join(PUBLIC)}")
    return ModelConfig(**config_kwargs(PUBLIC[name]), **overrides)
