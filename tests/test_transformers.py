"""Tests against Hugging Face transformers (tests/requirements.txt pins the version), a library that shares no code
with this project.

Two things are checked. First, that the two live side by side: scripts and notebooks run from this folder, which
puts it first on sys.path, so a top-level module of ours named like one that transformers imports would replace it
(a kernels.py did: transformers imports Hugging Face's kernels package at start-up). Second, that pretrained/ loads
what transformers' own MambaForCausalLM and Mamba2ForCausalLM save and computes what they compute: the same logits,
whole or in pieces with the State handed on, and the same final state as their cache.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrained import load_pretrained

transformers = pytest.importorskip("transformers", reason="pip install -r tests/requirements.txt")  # once: seconds
transformers.logging.set_verbosity_error()  # it says, per layer, that it falls back from CUDA kernels to PyTorch
transformers.utils.logging.disable_progress_bar()

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------------------------
# Importing transformers beside this folder's modules
# ----------------------------------------------------------------------------------------------------------------

def project_modules():
    """Every module of this project, as an import name: the top-level files and the files of its packages (a
    folder with __init__.py, or with __main__.py like bench/), tests/ aside."""
    names = sorted(path.stem for path in ROOT.glob("*.py"))
    for folder in sorted(p for p in ROOT.iterdir() if p.is_dir() and p.name != "tests"):
        if (folder / "__init__.py").exists() or (folder / "__main__.py").exists():
            names += [folder.name if path.stem == "__init__" else f"{folder.name}.{path.stem}"
                      for path in sorted(folder.glob("*.py"))]
    return names


# Run with `python -c` from this folder (so the folder is first on sys.path, as for a user's script). argv: the
# order, then the project's modules. It prints, as JSON, the modules loaded from this folder after the first step
# and after both, and what each model read.
IMPORT_SCRIPT = r'''
import importlib, json, os, sys

import torch

FOLDER = os.getcwd() + os.sep
ORDER, MODULES = sys.argv[1], sys.argv[2:]


def loaded_from_this_folder():
    def file_of(module):  # a few of torch's modules have a relative __file__ of no folder: they are not files here
        file = getattr(module, "__file__", None)
        return file if isinstance(file, str) and os.path.isabs(file) else ""
    return sorted(name for name, module in list(sys.modules.items()) if file_of(module).startswith(FOLDER))


def read(model, tokens):
    with torch.no_grad():
        logits = model(tokens)
    logits = logits.logits if hasattr(logits, "logits") else logits[0]
    return [list(logits.shape), bool(torch.isfinite(logits).all())]


def use_transformers():
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM
    tokens = torch.randint(0, 64, (1, 12))
    mamba2 = Mamba2ForCausalLM(Mamba2Config(vocab_size=64, hidden_size=16, num_hidden_layers=1, state_size=8,
                                            head_dim=8, num_heads=4, n_groups=1, chunk_size=8)).eval()
    mamba = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, state_size=8)).eval()
    return {"transformers Mamba2": read(mamba2, tokens), "transformers Mamba": read(mamba, tokens)}


def use_project():
    for name in MODULES:
        importlib.import_module(name)
    from model import LM, ModelConfig
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layer=1, mixer="mamba2", d_state=8, headdim=8, chunk_size=8,
                      backend="torch")
    return {"ours": read(LM(cfg).eval(), torch.randint(0, 64, (1, 12)))}


steps = [use_project, use_transformers] if ORDER == "project first" else [use_transformers, use_project]
results = steps[0]()
after_first = loaded_from_this_folder()
results.update(steps[1]())
print(json.dumps({"after_first": after_first, "after_both": loaded_from_this_folder(), "read": results}))
'''


def test_transformers_and_this_folders_modules_import_in_either_order():
    """Each order in a fresh process run from this folder: everything imports, both libraries' models read tokens,
    and no module that transformers imports is taken from this folder: with transformers first, nothing is loaded
    from here until our modules are imported; with ours first, transformers adds nothing from here."""
    modules = project_modules()
    assert {"model", "scan_kernels", "train", "eval", "pretrained", "runs", "bench.__main__"} <= set(modules)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    orders = ("transformers first", "project first")
    processes = {order: subprocess.Popen([sys.executable, "-c", IMPORT_SCRIPT, order, *modules], cwd=ROOT, env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for order in orders}  # side by side: each spends seconds importing
    report = {}
    for order, process in processes.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, f"{order}:\n{err}"
        report[order] = json.loads(out.strip().splitlines()[-1])
    for order in orders:
        read = report[order]["read"]
        assert read == {"transformers Mamba2": [[1, 12, 64], True], "transformers Mamba": [[1, 12, 64], True],
                        "ours": [[1, 12, 64], True]}, order
        assert set(modules) <= set(report[order]["after_both"]), order
    assert report["transformers first"]["after_first"] == []
    assert report["project first"]["after_both"] == report["project first"]["after_first"]


# ----------------------------------------------------------------------------------------------------------------
# transformers' models as the reference of pretrained/
# ----------------------------------------------------------------------------------------------------------------

VOCAB, D_MODEL, N_LAYER, CHUNK = 96, 32, 2, 16  # 96 rows: a multiple of mamba_ssm's padding (8 and 16), no padding
LENGTH, PIECES = 75, (29, 32, 14)  # not multiples of the chunk size of either library


def transformers_model(mixer, tied):
    """A tiny random MambaForCausalLM or Mamba2ForCausalLM (Mamba-2 with two groups, so that a wrong head-to-group
    map or an ungrouped norm shows), every parameter moved away from transformers' initialisation (D = 1, zero
    biases, unit norms), so that a parameter loaded into the wrong place or ignored changes the logits."""
    if mixer == "mamba2":
        config = transformers.Mamba2Config(vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYER,
                                           state_size=16, head_dim=8, num_heads=8, n_groups=2, expand=2,
                                           chunk_size=CHUNK, tie_word_embeddings=tied)
        model = transformers.Mamba2ForCausalLM(config)
    else:
        config = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYER,
                                          state_size=8, expand=2, tie_word_embeddings=tied)
        model = transformers.MambaForCausalLM(config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():  # a tied output layer is the embedding, moved once
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def as_mamba_ssm(folder, model, into):
    """The same model in mamba_ssm's layout (what its save_pretrained writes): its config.json, the embedding named
    backbone.embedding and a pytorch_model.bin that always holds lm_head.weight."""
    from safetensors.torch import load_file

    c = model.config
    if c.model_type == "mamba2":
        ssm_cfg = {"layer": "Mamba2", "d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand,
                   "headdim": c.head_dim, "ngroups": c.n_groups}
    else:
        ssm_cfg = {"d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand}  # Mamba-1: the default
    config = {"d_model": c.hidden_size, "n_layer": c.num_hidden_layers, "vocab_size": c.vocab_size,
              "ssm_cfg": ssm_cfg, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
              "pad_vocab_size_multiple": 8, "tie_embeddings": c.tie_word_embeddings}
    state = {name.replace("backbone.embeddings.", "backbone.embedding."): tensor
             for name, tensor in load_file(str(folder / "model.safetensors")).items()}
    state.setdefault("lm_head.weight", state["backbone.embedding.weight"])
    into.mkdir()
    (into / "config.json").write_text(json.dumps(config))
    torch.save(state, into / "pytorch_model.bin")
    return into


def relative_error(ours, reference):
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("layout", ["transformers", "mamba_ssm"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("mixer", ["mamba2", "mamba1"])
def test_pretrained_computes_what_transformers_computes(tmp_path, mixer, tied, layout):
    """transformers' model saved with its own save_pretrained (or converted to mamba_ssm's layout), loaded by
    pretrained/: the logits of a sequence read whole and in three pieces with the State handed on, and the final
    SSM and convolution states, against transformers' forward and its cache, both in float32. Measured: the logits
    differ by at most 6e-7 of the largest (about 5), the states by 7e-7 of theirs, float32 rounding of two
    different orders of summation; 1e-5 leaves room for other machines, and a real error moves the logits by a
    tenth of the largest or more (tests/test_pretrained.py measures the usual ones)."""
    reference = transformers_model(mixer, tied)
    reference.save_pretrained(tmp_path / "transformers")
    folder = tmp_path / "transformers"
    if layout == "mamba_ssm":
        folder = as_mamba_ssm(folder, reference, tmp_path / "mamba_ssm")
    model = load_pretrained(folder, backend="torch", chunk_size=CHUNK)
    assert model.cfg.mixer == mixer and model.cfg.tie_embeddings == tied

    tokens = torch.randint(0, VOCAB, (2, LENGTH))
    with torch.no_grad():
        expected = reference(tokens, use_cache=True)
        whole, _, final = model(tokens)
        pieces, state = [], None
        for piece in tokens.split(PIECES, dim=1):
            logits, _, state = model(piece, state=state)
            pieces.append(logits)
    assert expected.logits.abs().max() > 1.0  # logits that say something
    assert relative_error(whole, expected.logits) < 1e-5
    assert relative_error(torch.cat(pieces, dim=1), expected.logits) < 1e-5
    for layer in range(N_LAYER):  # transformers' cache: ssm (B, H, P, N), Mamba-1 (B, D, N); conv the last W inputs
        ssm, conv = expected.cache.get_recurrent_state(layer), expected.cache.get_conv_state(layer)
        for ours in (final, state):
            assert relative_error(ours.ssm[layer].reshape(ssm.shape), ssm) < 1e-5
            assert relative_error(ours.conv[layer], conv[..., 1:]) < 1e-5
