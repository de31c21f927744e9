"""Tests of eval.py and what it draws on (plots/, runs.piece_length, tasks/passkey.py and tasks/copy.py for --passkey
and --task copy): chunked reading is exact, the control and EffRem are what they claim, outputs are written,
passkey prompts are built and scored right, and errors are one clear line."""
import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval as evaluation
import plots
import pretrained
from data import load_corpus
import runs as run_files  # not "runs": the fixture of that name below
from model import LM, ModelConfig
from runs import (CHECKPOINT_FORMAT, UsageError, is_checkpoint, load_checkpoint, load_model, model_payload,
                  save_checkpoint)
from tasks import copy as copying, passkey

VOCAB = 40
NO_AUTOCAST = torch.autocast("cpu", enabled=False)


def save(model, path, **extra):
    """A checkpoint of model plus extra entries, as train.py writes it."""
    save_checkpoint(path, model_payload(model, **extra))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LM(ModelConfig(vocab_size=VOCAB, d_model=32, n_layer=2, mixer="mamba2", d_state=16, headdim=16,
                          chunk_size=16)).eval()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two small checkpoints as train.py writes them (a zero-init baseline and a state-passing run, T = 16), on
    the byte tokens of the tiny corpus. Random weights: the evaluation's mechanics do not depend on training."""
    root = tmp_path_factory.mktemp("evalruns")
    for seed, (name, init) in enumerate([("zero", "zero"), ("state_passing", "state_passing")]):
        torch.manual_seed(seed)
        save(LM(ModelConfig(vocab_size=257, d_model=32, n_layer=2, mixer="mamba2", d_state=16, headdim=16,
                            chunk_size=16)), root / name, args={"seq_len": 16, "init": init}, step=4,
             corpus={"name": "tiny", "tokenizer": "bytes"})
    return root


def full_pass_losses(model, tokens):
    with torch.no_grad():
        logits, _, _ = model(tokens[:, :-1])
    return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")


@pytest.mark.parametrize("chunk", [1, 7, 16, 100])
@pytest.mark.core
def test_chunked_losses_equal_one_full_pass(model, chunk):
    tokens = torch.randint(0, VOCAB, (3, 51))
    chunked = evaluation.position_losses(model, tokens, chunk, "cpu", NO_AUTOCAST)
    assert torch.allclose(chunked, full_pass_losses(model, tokens), atol=1e-4)


@pytest.mark.parametrize("chunk", [8192, 40, 5])  # every window in one pass, two windows a pass, windows in pieces
@pytest.mark.core
def test_control_resets_the_state_every_T(model, chunk):
    tokens = torch.randint(0, VOCAB, (2, 45))
    control = evaluation.control_losses(model, tokens, 16, "cpu", NO_AUTOCAST, chunk)
    for start in (0, 16, 32):
        window = tokens[:, start:min(start + 17, 45)]
        assert torch.allclose(control[:, start:start + window.shape[1] - 1], full_pass_losses(model, window),
                              atol=1e-4)


@pytest.mark.core
def test_effrem_is_zero_at_t0_and_matches_a_direct_computation(model):
    tokens = torch.randint(0, VOCAB, (4, 40))
    values = evaluation.effective_remembrance(model, tokens, 32, [0, 5, 31], "cpu", NO_AUTOCAST)
    assert values[0] == 0.0
    with torch.no_grad():
        full = torch.softmax(model(tokens[:, :32])[0][:, -1], -1)
        partial = torch.softmax(model(tokens[:, 5:32])[0][:, -1], -1)
    direct = (0.5 * (full - partial).abs().sum(-1)).mean().item()
    assert values[1] == pytest.approx(direct, abs=1e-5) and 0 < values[1] <= 1


@pytest.mark.core
def test_state_statistics_match_the_state_after_each_position(model):
    tokens = torch.randint(0, VOCAB, (2, 60))
    stats = evaluation.state_statistics(model, tokens, [3, 20, 60], 16, "cpu", NO_AUTOCAST)
    with torch.no_grad():
        _, _, state = model(tokens[:, :20])
    expected = state.ssm[1].flatten(1)
    assert stats["norm"][1][1] == pytest.approx(expected.norm(dim=1).mean().item(), rel=1e-4)
    assert stats["std"][1][1] == pytest.approx(expected.std(dim=1).mean().item(), rel=1e-4)


def test_log_bins_cover_every_position_once():
    min_bin = 8  # log_bins' default first: the narrowest bin
    bins = evaluation.log_bins(1000, 20)
    assert bins[0] == (0, min_bin) and bins[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in zip(bins, bins[1:]))
    assert all(end - start >= min_bin for start, end in bins)  # no single noisy position alone
    widths = [end - start for start, end in bins]
    assert widths[-1] > 10 * widths[1]  # log-spaced beyond the first bins
    assert evaluation.log_bins(5, 20) == [(0, 5)]


def test_summary_bands():
    losses = torch.arange(64, dtype=torch.float32)[None].repeat(2, 1)  # loss = position
    s = plots.summary(losses, 4)
    assert s["[T/2,T)"] == pytest.approx(2.5) and s["[2T,8T)"] == pytest.approx(19.5)
    assert s["[8T,len)"] == pytest.approx(47.5)
    short = plots.summary(losses[:, :20], 4)  # 20 < 8 T: bands the sequence does not cover whole are left out
    assert short["[2T,8T)"] is None and short["[8T,len)"] is None and short["[T/2,T)"] == pytest.approx(2.5)


def test_passkey_prompt_and_scoring():
    from corpora.tokenizer import bytes_encoding

    enc = bytes_encoding()
    for depth in (0.0, 0.5, 1.0):
        ids = passkey.passkey_prompt(enc, 2000, depth, 48213)
        text = enc.decode(ids)
        assert abs(len(ids) - 2000) < len(passkey.PASSKEY_FILLER) and text.endswith(passkey.PASSKEY_QUESTION)
        at = text.index("48213") / len(text)
        assert abs(at - depth) < 0.1
    assert passkey.score_answer(" 48213. Remember", 48213)
    assert not passkey.score_answer(" 4821", 48213) and not passkey.score_answer(" 12345", 48213)


def test_evaluation_writes_figures_and_tables(runs, tiny_corpus, tmp_path, capsys):
    data_dir, _ = tiny_corpus
    out = tmp_path / "eval"
    evaluation.main(["--ckpt", str(runs / "zero"), "--ckpt", str(runs / "state_passing" / "ckpt.pt"), "--len", "96",
                     "--num_seqs", "2", "--chunk", "32", "--out", str(out), "--data_dir", data_dir, "--effrem",
                     "--state_stats", "--passkey", "--passkey_lengths", "64", "--passkey_trials", "1",
                     "--passkey_filler", "varied", "--bins", "8"])
    assert json.loads((out / "passkey.json").read_text())["checkpoints"][0]["filler"] == "varied"
    for name in ("loss_vs_position.png", "loss_vs_position.csv", "effrem.png", "state_stats.png", "passkey.png"):
        assert (out / name).stat().st_size > 0
    record = json.loads((out / "loss_vs_position.json").read_text())
    assert record["len"] == 96 and len(record["sequence_starts"]) == 2
    assert [c["init"] for c in record["checkpoints"]] == ["zero", "state_passing"]
    assert [c["label"] for c in record["checkpoints"]] == ["zero", "state_passing"]  # run folders, order given
    for c in record["checkpoints"]:
        assert c["T"] == 16 and set(c["summary"]) == {"[T/2,T)", "[2T,8T)", "[8T,len)"}
        assert len(c["bins"]["loss"]) == len(c["bins"]["control"]) == len(c["bins"]["stderr"])
    effrem = json.loads((out / "effrem.json").read_text())["checkpoints"]
    assert [e["T"] for e in effrem] == [64, 64] and effrem[0]["effrem"][0] == 0.0
    stats = json.loads((out / "state_stats.json").read_text())["checkpoints"]
    assert len(stats) == 2 and len(stats[0]["norm"]) == 2 and stats[0]["positions"][-1] == 96
    printed = capsys.readouterr().out
    assert "[2T,8T)" in printed and "state_passing" in printed and str(out / "loss_vs_position.png") in printed


def test_every_checkpoint_reads_the_same_sequences(runs, tiny_corpus, tmp_path):
    data_dir, _ = tiny_corpus
    starts = []
    for ckpt in ("zero", "state_passing"):
        evaluation.main(["--ckpt", str(runs / ckpt), "--len", "64", "--num_seqs", "2", "--out",
                         str(tmp_path / ckpt), "--data_dir", data_dir])
        starts.append(json.loads((tmp_path / ckpt / "loss_vs_position.json").read_text())["sequence_starts"])
    assert starts[0] == starts[1]


def one_line_error(argv):
    with pytest.raises(SystemExit) as exit_info:
        evaluation.main(argv)
    message = str(exit_info.value.code)
    assert message.startswith("eval.py: error:") and "\n" not in message
    return message


def test_errors_are_one_line(runs, tiny_corpus, tmp_path):
    data_dir, _ = tiny_corpus
    message = one_line_error(["--ckpt", str(runs / "zero"), "--len", "131072", "--data_dir", data_dir])
    assert "--num_seqs" in message and "--len" in message
    assert str(tmp_path / "missing") in one_line_error(["--ckpt", str(tmp_path / "missing"), "--data_dir", data_dir])
    assert "--lenght" in one_line_error(["--lenght", "10"])
    assert "out" in one_line_error(["--data_dir", data_dir]) and "train.py" in one_line_error([])
    assert "--len" in one_line_error(["--ckpt", str(runs / "zero"), "--data_dir", data_dir, "--len", "8"])  # < T


def test_device_and_effrem_errors_come_before_any_work(runs, tiny_corpus, monkeypatch):
    if not torch.cuda.is_available():
        assert "--device" in one_line_error(["--ckpt", str(runs / "zero"), "--device", "cuda"])
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # as outside the tests: triton needs a GPU
        assert "--backend" in one_line_error(["--ckpt", str(runs / "zero"), "--device", "cpu", "--backend", "triton"])
        monkeypatch.undo()
    assert "--device" in one_line_error(["--ckpt", str(runs / "zero"), "--device", "tpu9"])
    message = one_line_error(["--ckpt", str(runs / "zero"), "--data_dir", tiny_corpus[0], "--len", "32",
                              "--effrem"])
    assert "--len" in message and "--effrem_T" in message


def test_reads_are_capped_for_large_vocabularies_and_many_rows():
    assert run_files.piece_length(8192, 1, 257) == 8192
    assert run_files.piece_length(8192, 8, 257) == 1024  # rows x length, not length alone, is bounded
    assert run_files.piece_length(8192, 1, 50257) * 50257 <= run_files.LOGITS_BUDGET
    assert run_files.piece_length(4, 8, 257) == 1  # never zero


def test_passkey_with_keys_of_different_token_counts():
    """GPT-2 splits 5-digit keys into different numbers of tokens; prompts of unequal length must still work."""
    from corpora import DataError
    from corpora.tokenizer import get_tokenizer

    try:
        enc = get_tokenizer("gpt2")
    except DataError:
        pytest.skip("the gpt2 vocabulary is neither cached nor downloadable here")
    lengths = {len(passkey.passkey_prompt(enc, 200, 0.5, key)) for key in range(10000, 10400, 7)}
    assert len(lengths) > 1  # the situation being tested really occurs
    model = LM(ModelConfig(vocab_size=enc.n_vocab, d_model=16, n_layer=1, mixer="gla", n_heads=2)).eval()
    accuracy = passkey.passkey_accuracy(model, enc, [200], [0.5], 6, "cpu", NO_AUTOCAST, chunk=64)
    assert len(accuracy) == 1 and 0.0 <= accuracy[0][0] <= 1.0


def test_models_that_cannot_read_the_corpus_are_refused(runs, tiny_corpus, tmp_path):
    ckpt = load_checkpoint(runs / "zero")
    config = ckpt["model_config"]
    save(LM(ModelConfig(**{**config, "vocab_size": 300})), tmp_path / "gpt2", args=ckpt["args"],
         corpus={"name": "tiny", "tokenizer": "gpt2"})
    save(LM(ModelConfig(**{**config, "vocab_size": 200})), tmp_path / "small", args=ckpt["args"],
         corpus={"name": "tiny", "tokenizer": "bytes"})
    base = ["--data_dir", tiny_corpus[0], "--len", "64", "--num_seqs", "1", "--out", str(tmp_path / "eval")]
    message = one_line_error(base + ["--ckpt", str(runs / "zero"), "--ckpt", str(tmp_path / "gpt2")])
    assert "gpt2" in message and "bytes" in message
    message = one_line_error(base + ["--ckpt", str(tmp_path / "gpt2"), "--data", "tiny"])
    assert "gpt2" in message and "--data" in message
    message = one_line_error(base + ["--ckpt", str(tmp_path / "small"), "--data", "tiny"])
    assert "257" in message and "200" in message and "--data" in message


def test_every_forward_pass_reads_at_most_chunk_tokens(runs, tiny_corpus, tmp_path, monkeypatch):
    """Memory does not grow with --len or --num_seqs: no pass of the model, the control, EffRem, the state
    statistics or passkey reads more than --chunk tokens (rows x length)."""
    sizes = []
    forward = LM.forward

    def recording_forward(self, idx, *args, **kwargs):
        sizes.append(idx.numel())
        return forward(self, idx, *args, **kwargs)

    monkeypatch.setattr(LM, "forward", recording_forward)
    evaluation.main(["--ckpt", str(runs / "zero"), "--len", "200", "--num_seqs", "3", "--chunk", "40",
                     "--out", str(tmp_path), "--data_dir", tiny_corpus[0], "--effrem", "--effrem_T", "100",
                     "--state_stats", "--passkey", "--passkey_lengths", "150", "--passkey_trials", "2"])
    assert max(sizes) <= 40 and max(sizes) >= 32  # bounded, yet the passes are not needlessly small
    assert sum(sizes) >= 2 * 3 * 200  # the model and the control both read everything


def test_summary_table_is_aligned_in_the_order_given(runs, tiny_corpus, tmp_path, capsys):
    evaluation.main(["--ckpt", str(runs / "state_passing"), "--ckpt", str(runs / "zero"), "--label", "SP",
                     "--label", "baseline", "--len", "160", "--num_seqs", "2", "--out", str(tmp_path),
                     "--data_dir", tiny_corpus[0]])
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model"))
    table = lines[header:header + 3]
    assert "nats per byte" in lines[header - 1] and "[8T,160)" in table[0]
    assert [line.split()[0] for line in table[1:]] == ["SP", "baseline"]
    # every column ends at the same character in the header and in the rows
    ends = [[m.end() for m in re.finditer(r"\S+(?: \(\S+\))?", line)] for line in table]
    assert ends[0][1:] == ends[1][1:] == ends[2][1:]


def test_default_checkpoints_baseline_first_and_labels(tmp_path):
    for name in ("a_run", "zero", "tbptt"):
        (tmp_path / "out" / name).mkdir(parents=True)
        (tmp_path / "out" / name / "ckpt.pt").write_bytes(b"")
    assert evaluation.find_checkpoints(None) == [str(Path("out") / n) for n in ("zero", "a_run", "tbptt")]


def test_runs_of_the_same_name_are_told_apart(runs, tmp_path, monkeypatch):
    model = load_model(runs / "zero")
    for group in ("a", "b"):
        save(model, tmp_path / group / "zero", args={"seq_len": 16, "init": "zero"})
    checkpoints = evaluation.load_all([str(tmp_path / "a" / "zero"), str(tmp_path / "b" / "zero")], None, "cpu",
                                      None)
    assert [c.label for c in checkpoints] == ["a/zero", "b/zero"]
    monkeypatch.chdir(tmp_path / "a" / "zero")
    assert evaluation.Checkpoint("ckpt.pt", "cpu").label == "zero"  # the folder's name, also from inside it


def test_perplexity_figure(runs, tiny_corpus, tmp_path):
    evaluation.main(["--ckpt", str(runs / "zero"), "--len", "64", "--num_seqs", "2", "--out", str(tmp_path),
                     "--data_dir", tiny_corpus[0], "--ppl"])
    assert (tmp_path / "loss_vs_position.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_options_and_files_are_one_line(runs, tiny_corpus, tmp_path, monkeypatch):
    base = ["--ckpt", str(runs / "zero"), "--data_dir", tiny_corpus[0], "--len", "64", "--num_seqs", "1"]
    (tmp_path / "a_file").write_text("keep me")
    assert "--out" in one_line_error(base + ["--out", str(tmp_path / "a_file")])
    assert (tmp_path / "a_file").read_text() == "keep me"
    assert "a_file" in one_line_error(base + ["--out", str(tmp_path / "a_file" / "eval")])  # mkdir's OSError
    for flag, values in (("--effrem_T", ["-5"]), ("--effrem_T", ["1"]), ("--passkey_lengths", ["0", "-3"]),
                         ("--passkey_depths", ["1.5"]), ("--bins", ["10000000000"]), ("--bins", ["0"]),
                         ("--effrem_points", ["100000000"]), ("--copy_strings", ["10000000000"]),
                         ("--copy_lengths", ["100000000"]), ("--passkey_lengths", ["10000000000"]),
                         ("--num_seqs", ["0"]), ("--chunk", ["0"]), ("--len", ["100000000000"])):
        assert flag in one_line_error(base + ["--effrem", flag, *values])
    assert "--label" in one_line_error(base + ["--label", "a", "--label", "b"])
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        assert "--device" in one_line_error(base + ["--device", "mps"])

    def disk_full(path, data):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(run_files, "write_atomically", disk_full)
    message = one_line_error(base + ["--out", str(tmp_path / "eval")])
    assert "loss_vs_position.json" in message


def test_broken_checkpoints_are_one_line(runs, tiny_corpus, tmp_path):
    ckpt = load_checkpoint(runs / "zero")
    name = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][name] = torch.full_like(ckpt["model"][name], float("nan"))
    (tmp_path / "nan").mkdir()
    torch.save(ckpt, tmp_path / "nan" / "ckpt.pt")  # as a crash of an older version might have left it
    (tmp_path / "bare").mkdir()
    torch.save({"format": CHECKPOINT_FORMAT}, tmp_path / "bare" / "ckpt.pt")
    base = ["--data_dir", tiny_corpus[0], "--len", "64", "--num_seqs", "1", "--out", str(tmp_path / "eval")]
    assert str(tmp_path / "nan") in one_line_error(base + ["--ckpt", str(tmp_path / "nan")])
    assert str(tmp_path / "bare") in one_line_error(base + ["--ckpt", str(tmp_path / "bare")])
    assert not (tmp_path / "eval" / "loss_vs_position.json").exists()


# ----------------------------------------------------------------------------------------------------------------
# Official Mamba-2 models (pretrained/): a folder with config.json, or a Hugging Face name
# ----------------------------------------------------------------------------------------------------------------

def write_official_layout(model, folder):
    """A model in mamba_ssm's layout (config.json and pytorch_model.bin with the official tensor names)."""
    cfg = model.cfg
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "d_model": cfg.d_model, "d_intermediate": 0, "n_layer": cfg.n_layer, "vocab_size": cfg.vocab_size,
        "ssm_cfg": {"layer": "Mamba2", "d_state": cfg.d_state, "headdim": cfg.headdim, "chunk_size": 16},
        "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": cfg.pad_vocab_multiple, "tie_embeddings": True}))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def test_a_model_in_the_official_layout_reads_like_the_same_checkpoint(runs, tiny_corpus, tmp_path, capsys):
    folder = write_official_layout(load_model(runs / "zero"), tmp_path / "tiny-mamba2")
    base = ["--ckpt", str(folder), "--data_dir", tiny_corpus[0], "--len", "160", "--num_seqs", "2"]
    assert "--train_len" in one_line_error(base + ["--data", "tiny"])
    assert "--data" in one_line_error(base + ["--train_len", "16"])
    evaluation.main(base + ["--ckpt", str(runs / "zero"), "--data", "tiny", "--train_len", "16", "--effrem",
                            "--out", str(tmp_path / "eval")])
    official, own = json.loads((tmp_path / "eval" / "loss_vs_position.json").read_text())["checkpoints"]
    assert official["label"] == "tiny-mamba2" and official["T"] == 16
    for band, value in own["summary"].items():  # the same weights give the same losses
        assert official["summary"][band] == pytest.approx(value, rel=1e-5)


def test_which_names_go_to_load_pretrained(runs, tmp_path, monkeypatch):
    """runs.is_checkpoint is the one rule, for train.py, eval.py and pretrained.load_pretrained alike."""
    (tmp_path / "out" / "zero").mkdir(parents=True)
    assert not is_checkpoint("state-spaces/mamba2-370m")  # nothing here by that name: the Hub
    assert is_checkpoint("out/zero")  # a run folder (without its ckpt.pt: the error will say so)
    assert is_checkpoint("out/missing") and is_checkpoint(str(tmp_path / "nothing"))
    assert is_checkpoint(str(runs / "zero")) and is_checkpoint(str(runs / "zero" / "ckpt.pt"))
    write_official_layout(load_model(runs / "zero"), tmp_path / "state-spaces" / "local")
    assert not is_checkpoint("state-spaces/local")
    asked = []
    monkeypatch.setattr(pretrained, "load_pretrained", lambda name, device, **kw: asked.append(name)
                        or load_model(runs / "zero"))
    assert evaluation.Checkpoint("someone/model", "cpu").label == "model" and asked == ["someone/model"]


# ----------------------------------------------------------------------------------------------------------------
# Passkey retrieval (tasks/passkey.py) and the fine-tuning task
# ----------------------------------------------------------------------------------------------------------------

def test_passkey_defaults_are_the_papers(monkeypatch):
    """Without --passkey_lengths and --passkey_depths, the grid measured (and recorded) is the paper's."""
    args = evaluation.parse([])
    assert args.passkey_lengths is None and args.passkey_depths is None  # filled in when measured
    asked = []

    def accuracy(model, tokenizer, lengths, depths, *rest, **kw):
        asked.append((lengths, depths))
        return [[0.0] * len(depths) for _ in lengths]

    monkeypatch.setattr(passkey, "passkey_accuracy", accuracy)
    corpus = type("Corpus", (), {"tokenizer": lambda self: None})()
    checkpoint = type("Checkpoint", (), {"label": "m", "model": None, "record": lambda self: {"label": "m"}})()
    reading = evaluation.Reading(args, torch.device("cpu"), NO_AUTOCAST, [checkpoint], corpus=corpus)
    record, = passkey.measure_passkey([checkpoint], reading)
    papers = ([2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144], [0.1, 0.5, 0.9])
    assert asked == [papers] and (record["lengths"], record["depths"]) == papers


def test_passkey_training_examples():
    from corpora.tokenizer import bytes_encoding

    enc = bytes_encoding()
    task = passkey.PasskeyTask(enc, max_len=600)
    assert task.vocab_size == 257 and task.train_tokens == 600
    generator = torch.Generator().manual_seed(0)
    lengths, depths = set(), []
    for _ in range(20):
        inputs, targets = task.batch(3, generator)
        assert inputs.shape == targets.shape and inputs.shape[0] == 3
        lengths.add(inputs.shape[1])
        assert task.min_len <= inputs.shape[1] <= 600
        for row, target in zip(inputs, targets):
            text = enc.decode(row.tolist())
            key = text[-6:-1]
            counted = target >= 0
            assert enc.decode(target[counted].tolist()) == f" {key}."  # the loss is on the answer only
            assert torch.equal(target[:-1][counted[:-1]], row[1:][counted[:-1]])  # target = the next token
            assert text.startswith(passkey.PASSKEY_INTRO) and text.endswith(passkey.PASSKEY_QUESTION + f" {key}.")
            filler = len(text) - len(passkey.PASSKEY_INTRO) - len(passkey.PASSKEY_QUESTION) - 7
            depths.append((text.index(f"is {key}.") - len(passkey.PASSKEY_INTRO)) / filler)
    assert len(lengths) > 10  # lengths vary from batch to batch
    assert min(depths) < 0.15 and max(depths) > 0.7 and 0.3 < sum(depths) / len(depths) < 0.7  # depths spread
    with pytest.raises(ValueError, match="too short"):
        passkey.PasskeyTask(enc, max_len=100)


def test_varied_passkey_filler_is_natural_text_of_the_exact_length():
    """--passkey_filler varied: the prompt is exactly `length` tokens, the key sits at its depth between two
    sentences, the filler is many different sentences (not one line again and again), and another start gives other
    text; training examples likewise, while the paper's repeated filler stays whole lines of PASSKEY_FILLER."""
    from corpora.tokenizer import bytes_encoding

    enc = bytes_encoding()
    for depth in (0.0, 0.5, 1.0):
        ids = passkey.passkey_prompt(enc, 3000, depth, 48213, filler="varied", start=7)
        text = enc.decode(ids)
        assert len(ids) == 3000 and text.startswith(passkey.PASSKEY_INTRO) and text.endswith(passkey.PASSKEY_QUESTION)
        needle = passkey.passkey_needle(48213)
        before = text[len(passkey.PASSKEY_INTRO):text.index(needle)]
        assert abs(len(before) / (3000 - len(passkey.PASSKEY_INTRO) - len(needle) - len(passkey.PASSKEY_QUESTION))
                   - depth) < 0.05
        after = text[text.index(needle) + len(needle):-len(passkey.PASSKEY_QUESTION)]
        assert before == "" or before.endswith(". ") or after == ""  # between sentences, or after the (cut) last
        filler = before + after
        assert passkey.PASSKEY_FILLER not in filler and len(set(filler.split(". "))) > 20
    other = enc.decode(passkey.passkey_prompt(enc, 3000, 0.5, 48213, filler="varied", start=8))
    assert other != text and len(passkey.passkey_prompt(enc, 3000, 0.5, 48213)) <= 3000  # repeated: whole lines
    task = passkey.PasskeyTask(enc, max_len=600, passkey_filler="varied")
    inputs, targets = task.batch(4, torch.Generator().manual_seed(0))
    texts = [enc.decode(row.tolist()) for row in inputs]
    assert len(set(texts)) == 4 and all(passkey.PASSKEY_FILLER not in t for t in texts)
    for row, target, text in zip(inputs, targets, texts):
        key = text[-6:-1]
        assert enc.decode(target[target >= 0].tolist()) == f" {key}." and passkey.passkey_needle(int(key)) in text
    inputs, _ = passkey.PasskeyTask(enc, max_len=600).batch(4, torch.Generator().manual_seed(0))
    for row in inputs:
        text = enc.decode(row.tolist())
        filler = text[len(passkey.PASSKEY_INTRO):text.index("The pass key is")]
        assert filler == passkey.PASSKEY_FILLER * (len(filler) // len(passkey.PASSKEY_FILLER))  # whole lines


def test_passkey_training_loss_counts_the_answer_only():
    from corpora.tokenizer import bytes_encoding

    task = passkey.PasskeyTask(bytes_encoding(), max_len=400)
    inputs, targets = task.batch(2, torch.Generator().manual_seed(1))
    model = LM(ModelConfig(vocab_size=task.vocab_size, d_model=16, n_layer=1, mixer="gla", n_heads=2)).eval()
    with torch.no_grad():
        logits, loss, _ = model(inputs, targets)
    answer = targets >= 0
    expected = F.cross_entropy(logits[answer], targets[answer])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_passkey_examples_with_a_bpe_tokenizer():
    from corpora import DataError
    from corpora.tokenizer import get_tokenizer

    try:
        enc = get_tokenizer("gpt2")
    except DataError:
        pytest.skip("the gpt2 vocabulary is neither cached nor downloadable here")
    task = passkey.PasskeyTask(enc, max_len=2048)
    inputs, targets = task.batch(8, torch.Generator().manual_seed(0))
    answers = [enc.decode(t[t >= 0].tolist()) for t in targets]
    assert all(passkey.score_answer(a, int(a.strip(" ."))) for a in answers)
    assert len({int((t >= 0).sum()) for t in targets}) > 1  # keys of different token counts, rows of equal length


# ----------------------------------------------------------------------------------------------------------------
# The copy task (tasks/copy.py)
# ----------------------------------------------------------------------------------------------------------------

def save_copy_run(folder, seed, init):
    """A checkpoint as train.py --task copy writes it (alphabet of 4, strings up to 4 characters), random weights."""
    torch.manual_seed(seed)
    save(LM(ModelConfig(vocab_size=7, d_model=16, n_layer=1, mixer="mamba2", d_state=8, headdim=8, chunk_size=16)),
         folder, args={"task": "copy", "alphabet_size": 4, "n_train": 4, "context": 0, "seq_len": 11, "init": init},
         step=4, corpus={"name": "task copy", "tokenizer": None})


@pytest.fixture(scope="module")
def copy_runs(tmp_path_factory):
    """Two checkpoints as train.py --task copy writes them (alphabet of 4, strings up to 4 characters)."""
    root = tmp_path_factory.mktemp("copyruns")
    for seed, init in enumerate(("zero", "state_passing")):
        save_copy_run(root / init, seed, init)
    return root


def test_copy_accuracy_against_length(copy_runs, tmp_path, capsys):
    evaluation.main(["--ckpt", str(copy_runs / "zero"), "--ckpt", str(copy_runs / "state_passing"),
                     "--copy_lengths", "1", "4", "9", "--copy_strings", "5", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "copy_accuracy.json").read_text())
    assert record["task"] == "copy" and record["n_train"] == 4 and record["alphabet_size"] == 4
    zero = record["checkpoints"][0]
    assert zero["label"] == "zero" and zero["lengths"] == [1, 4, 9] and zero["n_train"] == 4
    direct = copying.copy_accuracy(load_model(copy_runs / "zero"), copying.CopyTask(4, 4), [1, 4, 9], 5)
    assert zero["greedy"] == [direct[n][0] for n in (1, 4, 9)]
    assert zero["teacher_forced"] == pytest.approx([direct[n][2] for n in (1, 4, 9)])
    assert (tmp_path / "copy_accuracy.png").stat().st_size > 0 and (tmp_path / "copy_accuracy.csv").exists()
    printed = capsys.readouterr().out
    assert "trained on n <= 4" in printed and "state_passing" in printed
    assert not (tmp_path / "loss_vs_position.json").exists()  # no text to read


def test_copy_defaults_and_errors(copy_runs, runs, tiny_corpus, tmp_path, capsys):
    assert evaluation.parse([]).copy_strings == 256  # a standard error over strings of at most 0.031 per length
    evaluation.main(["--ckpt", str(copy_runs / "zero"), "--copy_strings", "2", "--out", str(tmp_path / "all")])
    record = json.loads((tmp_path / "all" / "copy_accuracy.json").read_text())
    assert record["checkpoints"][0]["lengths"] == list(range(1, 17))  # every length from 1 to 4 n_train
    copy = ["--ckpt", str(copy_runs / "zero"), "--out", str(tmp_path)]
    assert "--effrem" in one_line_error(copy + ["--effrem"])
    assert "--task" in one_line_error(copy + ["--task", "lm"])
    message = one_line_error(copy + ["--ckpt", str(runs / "zero")])
    assert "copy" in message and "lm" in message
    assert "--copy_lengths" in one_line_error(copy + ["--copy_lengths", "0"])
    assert "--task copy" in one_line_error(["--task", "copy"])  # no runs yet: the command that makes one


def test_seeds_of_one_label_are_one_model(copy_runs, tmp_path, capsys):
    """Three checkpoints labelled zero become one model: per length and per range of lengths, the mean and std
    (ddof 1) across seeds of the per-seed accuracies, as a direct computation gives them; a single seed is itself."""
    for seed in range(3):
        save_copy_run(tmp_path / f"s{seed}" / "zero", 10 + seed, "zero")
    lengths = [1, 4, 9, 16, 17]  # within n_train = 4: 1, 4; beyond, up to 16: 9, 16; 17 is in neither range
    seeds = [str(tmp_path / f"s{seed}" / "zero") for seed in range(3)]
    evaluation.main([arg for s in seeds for arg in ("--ckpt", s, "--label", "zero")]
                    + ["--ckpt", str(copy_runs / "state_passing"), "--label", "SP", "--copy_lengths",
                       *map(str, lengths), "--copy_strings", "6", "--out", str(tmp_path / "eval")])
    record = json.loads((tmp_path / "eval" / "copy_accuracy.json").read_text())
    assert [c["label"] for c in record["checkpoints"]] == ["s0/zero", "s1/zero", "s2/zero", "SP"]
    zero, sp = record["models"]
    assert (zero["label"], zero["seeds"], sp["label"], sp["seeds"]) == ("zero", 3, "SP", 1)
    task = copying.CopyTask(4, 4, 0)
    direct = [copying.copy_accuracy(load_model(s), task, lengths, 6) for s in seeds]
    greedy = np.array([[d[n][0] for n in lengths] for d in direct])  # (seeds, lengths)
    forced = np.array([[d[n][2] for n in lengths] for d in direct])
    assert zero["greedy"] == pytest.approx(greedy.mean(0).tolist(), abs=1e-12)
    assert zero["greedy_std"] == pytest.approx(greedy.std(0, ddof=1).tolist(), abs=1e-12)
    assert zero["teacher_forced_std"] == pytest.approx(forced.std(0, ddof=1).tolist(), abs=1e-6)
    beyond = greedy[:, 2:4].mean(1)  # each seed's mean over n = 9, 16
    assert zero["greedy_beyond"]["per_seed"] == pytest.approx(beyond.tolist(), abs=1e-12)
    assert zero["greedy_beyond"]["mean"] == pytest.approx(beyond.mean(), abs=1e-12)
    assert zero["greedy_beyond"]["std"] == pytest.approx(beyond.std(ddof=1), abs=1e-12)
    assert zero["greedy_beyond"]["std"] > 0  # three different models: a real spread, not a copy of one seed
    within = forced[:, :2].mean(1)
    assert zero["teacher_forced_within"]["mean"] == pytest.approx(within.mean(), abs=1e-6)
    # the standard error over strings: the largest of the seeds', per length and overall
    strings = task.eval_strings(9, 6)
    per_string = [copying.teacher_forced_accuracy(load_model(s), task, strings).double() for s in seeds]
    assert zero["teacher_forced_stderr"][2] == pytest.approx(max(p.std().item() / 6 ** 0.5 for p in per_string))
    assert zero["max_stderr"] == max(max(c["greedy_stderr"] + c["teacher_forced_stderr"])
                                     for c in record["checkpoints"][:3])
    only = record["checkpoints"][3]  # one seed: the model is that checkpoint, its spread 0
    assert sp["greedy"] == only["greedy"] and sp["greedy_std"] == [0.0] * 5
    assert sp["teacher_forced_beyond"]["mean"] == pytest.approx(np.mean(only["teacher_forced"][2:4]))
    # the table: one row per model, mean ± std for several seeds, the value alone for one
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.split()[:2] == ["zero", "3"])
    assert f"{zero['greedy_within']['mean']:.3f} ± {zero['greedy_within']['std']:.3f}" in row
    assert f"{beyond.mean():.3f} ± {beyond.std(ddof=1):.3f}" in row and row.endswith(f"{zero['max_stderr']:.4f}")
    sp_row = next(line for line in printed.splitlines() if line.split()[:2] == ["SP", "1"])
    assert "±" not in sp_row and f"{sp['greedy_within']['mean']:.3f}" in sp_row
    assert ("warning: a standard error" in printed) == (zero["max_stderr"] >= 0.02 or sp["max_stderr"] >= 0.02)
    assert max(zero["max_stderr"], sp["max_stderr"]) >= 0.02  # 6 strings: far too few, and said so
    with open(tmp_path / "eval" / "copy_accuracy.csv") as f:
        rows = list(csv.DictReader(f))
    zero_beyond = next(r for r in rows if r["label"] == "zero" and (r["n_min"], r["n_max"]) == ("5", "16"))
    assert float(zero_beyond["greedy"]) == pytest.approx(beyond.mean()) and zero_beyond["seeds"] == "3"
    assert float(zero_beyond["greedy_std"]) == pytest.approx(beyond.std(ddof=1))
    assert len(rows) == 2 * (2 + len(lengths))  # per model: the two ranges, then every length
    assert (tmp_path / "eval" / "copy_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seeds_are_found_and_named_by_their_run_folder(runs, tmp_path, monkeypatch):
    """out/copy/sN/NAME are seeds of NAME without any --label; text runs keep their one level and their
    told-apart labels."""
    for folder, seed in (("s0/zero", 0), ("s1/zero", 1), ("s0/state_passing", 2), ("tbptt", 3)):
        save_copy_run(tmp_path / "out" / "copy" / folder, seed, "zero")
    (tmp_path / "out" / "lm_run" / "nested").mkdir(parents=True)
    (tmp_path / "out" / "lm_run" / "nested" / "ckpt.pt").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    found = evaluation.find_checkpoints(None, "copy")
    assert found == [str(Path("out/copy") / f) for f in ("s0/zero", "s1/zero", "s0/state_passing", "tbptt")]
    with pytest.raises(UsageError, match="no checkpoints under out/"):
        evaluation.find_checkpoints(None)  # text runs are one level deep: out/lm_run/nested is not one
    checkpoints = evaluation.load_all(found, None, "cpu", None)
    assert [c.name for c in checkpoints] == ["zero", "zero", "state_passing", "tbptt"]
    assert [c.label for c in checkpoints] == ["s0/zero", "s1/zero", "state_passing", "tbptt"]
    # text checkpoints given one --label twice: told apart as before, one name
    lm = evaluation.load_all([str(runs / "zero"), str(runs / "state_passing")], ["x", "x"], "cpu", None)
    assert [c.label for c in lm] == [f"{runs.name}/zero", f"{runs.name}/state_passing"] and lm[0].name == "x"


def test_a_model_fine_tuned_on_passkeys_is_read_as_a_language_model(runs, tiny_corpus, tmp_path):
    """train.py --task passkey fine-tunes a language model on examples made of text: eval.py reads it on a corpus of
    its tokens (--passkey among the rest), and asks for --data since the run names no corpus of its own."""
    data_dir, name = tiny_corpus
    ckpt = load_checkpoint(runs / "zero")
    save(load_model(ckpt), tmp_path / "passkey", step=2, args={**ckpt["args"], "task": "passkey"},
         corpus={"name": "task passkey", "tokenizer": "bytes", "tokenizer_sha256": None})
    base = ["--ckpt", str(tmp_path / "passkey"), "--len", "256", "--num_seqs", "2", "--data_dir", data_dir,
            "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert "not trained on a corpus of this project: give --data" in one_line_error(base)
    evaluation.main(base + ["--data", name, "--passkey", "--passkey_lengths", "64", "--passkey_trials", "1"])
    assert (tmp_path / "out" / "passkey.json").exists() and (tmp_path / "out" / "loss_vs_position.json").exists()


def save_copy_copies(folder, seed, init, steps):
    """A copy run as train.py --task copy --save_every writes it: ckpt_STEP.pt along the way and ckpt.pt at the
    end, random weights that differ from step to step."""
    for step in steps:
        torch.manual_seed(1000 * seed + step)
        model = LM(ModelConfig(vocab_size=7, d_model=16, n_layer=1, mixer="mamba2", d_state=8, headdim=8,
                               chunk_size=16))
        args = {"task": "copy", "alphabet_size": 4, "n_train": 4, "context": 0, "seq_len": 11, "init": init}
        for name in ([f"ckpt_{step}.pt"] + (["ckpt.pt"] if step == steps[-1] else [])):
            save(model, folder / name, args=args, step=step, corpus={"name": "task copy", "tokenizer": None})


def test_copy_accuracy_along_training_and_the_state_along_long_examples(tmp_path, capsys):
    """--along_training reads every ckpt_STEP.pt of each run (seeds of one name averaged per step); --state_stats on
    copy runs follows the state along examples 4 n_train long, with the largest norm of training-length examples."""
    for seed in range(2):
        save_copy_copies(tmp_path / f"s{seed}" / "zero", seed, "zero", steps=(2, 4, 6))
        save_copy_copies(tmp_path / f"s{seed}" / "sp", seed + 10, "state_passing", steps=(2, 4, 6))
    runs = [str(tmp_path / f"s{s}" / name) for name in ("zero", "sp") for s in range(2)]
    evaluation.main([x for r in runs for x in ("--ckpt", r)] + ["--along_training", "--state_stats",
                    "--copy_lengths", "2", "6", "--copy_strings", "3", "--out", str(tmp_path / "eval")])
    along = json.loads((tmp_path / "eval" / "copy_along_training.json").read_text())
    assert sorted({(c["model"], c["step"]) for c in along["checkpoints"]}) == [
        (name, step) for name in ("sp", "zero") for step in (2, 4, 6)]
    assert len(along["checkpoints"]) == 12  # 2 models x 2 seeds x 3 steps: ckpt.pt is step 6, read once
    zero = next(m for m in along["models"] if m["label"] == "zero")
    assert zero["steps"] == [2, 4, 6] and zero["seeds"] == [2, 2, 2]
    at_4 = [c for c in along["checkpoints"] if c["model"] == "zero" and c["step"] == 4]
    beyond = [c["greedy"][1] for c in at_4]  # n = 6 is beyond n_train = 4
    assert zero["greedy_beyond"][1] == pytest.approx(np.mean(beyond)) and zero["greedy_beyond_std"][1] == \
        pytest.approx(np.std(beyond, ddof=1))
    assert (tmp_path / "eval" / "copy_along_training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "training step" in capsys.readouterr().out
    states = json.loads((tmp_path / "eval" / "state_stats.json").read_text())["checkpoints"]
    assert len(states) == 4 and states[0]["positions"][-1] == 8 * 4 + 3  # start, 16 characters, copy, 16, end
    model = load_model(tmp_path / "s0" / "zero")
    task = copying.CopyTask(4, 4)
    with torch.no_grad():
        _, _, after = model(task.sequences(task.eval_strings(4, 3))[:, :5])  # 5 tokens of a training example
    assert states[0]["training_range"][0] >= after.ssm[0].flatten(1).norm(dim=1).mean().item() - 1e-4


# ----------------------------------------------------------------------------------------------------------------
# What the figure averages, which flags apply, which checkpoints are read
# ----------------------------------------------------------------------------------------------------------------

def test_binned_standard_error_is_across_the_sequences_each_bin_holds():
    long, short = torch.randn(4, 100), torch.randn(60, 10)  # 4 sequences reach position 100, 60 more reach 10
    means, errors, counts = plots.binned([long, short], [(0, 10), (10, 100)])
    assert counts == [64, 4]
    first = torch.cat([long[:, :10].mean(1), short.mean(1)])
    assert means[0] == pytest.approx(first.mean().item()) and errors[0] == pytest.approx(first.std().item() / 8)
    assert errors[1] == pytest.approx(long[:, 10:].mean(1).std().item() / 2)


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    """A byte corpus of 600 short documents (a .jsonl, a document a line), half of them held out: document starts
    enough for the short sequences of the first bins.  (data_dir, name)"""
    from corpora.prepare import prepare

    root = tmp_path_factory.mktemp("documents")
    rng = np.random.default_rng(0)
    words = ["def", "return", "x", "for", "in", "range(n)", "if", "else:", "\n", "    ", "# a comment", "0", "42"]
    with open(root / "docs.jsonl", "w") as f:
        for _ in range(600):
            text = " ".join(rng.choice(words, size=int(rng.integers(10, 60))))
            f.write(json.dumps({"text": text}) + "\n")
    prepare(root / "docs.jsonl", name="docs", data_dir=root / "data", val_fraction=0.5, workers=1)
    return str(root / "data"), "docs"


def test_every_bin_averages_enough_tokens_and_its_band_narrows_with_them(runs, documents, tmp_path):
    """Short positions are also read on other documents' first tokens until each bin holds --bin_tokens tokens,
    never the same text twice in a bin; each bin's standard error is across the sequences it holds, so it narrows
    where they are many; the long sequences, the bins they hold alone and the summary table are unchanged."""
    base = ["--ckpt", str(runs / "zero"), "--ckpt", str(runs / "state_passing"), "--len", "256", "--num_seqs", "2",
            "--bins", "12", "--data", documents[1], "--data_dir", documents[0]]
    evaluation.main(base + ["--bin_tokens", "0", "--out", str(tmp_path / "alone")])
    evaluation.main(base + ["--bin_tokens", "200", "--out", str(tmp_path / "more")])
    alone, more = (json.loads((tmp_path / name / "loss_vs_position.json").read_text()) for name in ("alone", "more"))
    assert alone["sequence_starts"] == more["sequence_starts"] and alone["short_sequences"]["lengths"] == []
    lengths, starts = more["short_sequences"]["lengths"], more["short_sequences"]["starts"]
    corpus = load_corpus(documents[1], documents[0])
    tokens, eot = corpus.tokens("val"), corpus.meta["eot_token"]
    assert all(s == 0 or tokens[s - 1] == eot for s in starts + more["sequence_starts"])  # all at document starts
    reach = max(lengths) + 1
    spans = sorted([(s, s + n + 1) for s, n in zip(starts, lengths)]
                   + [(s, s + reach) for s in more["sequence_starts"]])
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no text in two sequences of one bin
    narrowing = []
    for a, m in zip(alone["checkpoints"], more["checkpoints"]):
        bins = m["bins"]
        widths = np.subtract(bins["end"], bins["start"])
        counts = np.array(bins["sequences"])
        assert (counts * widths >= 200).all() and a["bins"]["sequences"] == [2] * len(widths)
        assert counts[0] == 25  # 200 / 8 in the first bin, the two long sequences among them
        assert bins["sequences"] == [2 + sum(n >= end for n in lengths) for end in bins["end"]]
        assert m["summary"] == a["summary"]
        alone_bins = counts == 2
        assert np.array(bins["loss"])[alone_bins].tolist() == np.array(a["bins"]["loss"])[alone_bins].tolist()
        more_read = counts > 8
        narrowing.append(np.array(a["bins"]["stderr"])[more_read] / np.array(bins["stderr"])[more_read])
    assert np.median(np.concatenate(narrowing)) > 1.5  # the band narrows where many more sequences are read
    # the first model's curve and band, from one full pass over each sequence recorded in the JSON
    model, bins = load_model(runs / "zero"), more["checkpoints"][0]["bins"]
    texts = [(s, 256) for s in more["sequence_starts"]] + list(zip(starts, lengths))
    losses = [full_pass_losses(model, torch.from_numpy(tokens[s:s + n + 1].astype(np.int64))[None])[0]
              for s, n in texts]
    for start, end, mean, stderr in zip(bins["start"], bins["end"], bins["loss"], bins["stderr"]):
        per_seq = torch.stack([x[start:end].mean() for x in losses if len(x) >= end])
        assert mean == pytest.approx(per_seq.mean().item(), rel=1e-5)
        assert stderr == pytest.approx(per_seq.std().item() / len(per_seq) ** 0.5, rel=1e-3)


def test_many_short_sequences_are_read_a_few_rows_a_pass(runs, documents, tmp_path, monkeypatch):
    """Memory: every row of a pass carries a whole state, so the short sequences (here 25 for the first bin) are
    read no more rows a pass than the control reads windows (--chunk // T), and no pass reads more than --chunk."""
    shapes = []
    forward = LM.forward

    def recording_forward(self, idx, *args, **kwargs):
        shapes.append(tuple(idx.shape))
        return forward(self, idx, *args, **kwargs)

    monkeypatch.setattr(LM, "forward", recording_forward)
    evaluation.main(["--ckpt", str(runs / "zero"), "--len", "256", "--num_seqs", "2", "--bins", "12", "--chunk", "64",
                     "--bin_tokens", "200", "--data", documents[1], "--data_dir", documents[0], "--out", str(tmp_path)])
    assert max(rows for rows, _ in shapes) == 64 // 16  # T = 16
    assert max(rows * length for rows, length in shapes) <= 64
    record = json.loads((tmp_path / "loss_vs_position.json").read_text())
    assert len(record["short_sequences"]["lengths"]) == 23  # read, in passes of at most 4 rows


def test_too_few_documents_for_the_short_sequences_is_said(runs, tiny_corpus, tmp_path, capsys):
    """The tiny corpus holds out part of one document: the bins keep the sequences there are, and say so."""
    evaluation.main(["--ckpt", str(runs / "zero"), "--len", "64", "--num_seqs", "2", "--data_dir", tiny_corpus[0],
                     "--out", str(tmp_path)])
    assert "--bin_tokens" in capsys.readouterr().out
    bins = json.loads((tmp_path / "loss_vs_position.json").read_text())["checkpoints"][0]["bins"]
    assert bins["sequences"][0] < 4096 // 8 and min(bins["sequences"]) >= 2


@pytest.mark.parametrize("extra,flag", [
    (["--label", ""], "--label"), (["--label", " "], "--label"), (["--out", ""], "--out"),
    (["--copy_lengths", "4"], "--copy_lengths"), (["--copy_strings", "8"], "--copy_strings"),
    (["--along_training"], "--along_training"),
    (["--effrem_T", "32"], "--effrem_T"), (["--effrem_points", "5"], "--effrem_points"),
    (["--passkey_lengths", "64"], "--passkey_lengths"), (["--passkey_depths", "0.5"], "--passkey_depths"),
    (["--passkey_trials", "2"], "--passkey_trials"), (["--passkey_filler", "varied"], "--passkey_filler"),
    (["--train_len", "16"], "--train_len"),
])
def test_flags_that_do_not_apply_are_refused_naming_them(runs, tiny_corpus, tmp_path, extra, flag):
    base = ["--ckpt", str(runs / "zero"), "--data_dir", tiny_corpus[0], "--len", "64", "--num_seqs", "1",
            "--out", str(tmp_path / "eval")]
    assert flag in one_line_error(base + extra)  # one line, exit status 1 (a message given to SystemExit)
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("extra,flag", [
    (["--len", "64"], "--len"), (["--num_seqs", "2"], "--num_seqs"), (["--bins", "8"], "--bins"),
    (["--bin_tokens", "64"], "--bin_tokens"), (["--data", "tiny"], "--data"), (["--ppl"], "--ppl"),
    (["--effrem"], "--effrem"), (["--passkey"], "--passkey"),
])
def test_text_flags_are_refused_for_models_of_the_copy_task(copy_runs, tmp_path, extra, flag):
    """The task is known once the checkpoints say it: the text's flags are refused then, before any reading."""
    assert flag in one_line_error(["--ckpt", str(copy_runs / "zero"), "--out", str(tmp_path / "eval")] + extra)
    assert not (tmp_path / "eval").exists()


def test_a_flag_that_does_not_apply_exits_as_train_py_does(runs, tmp_path):
    """The same exit status and one line as train.py's refusals (runs.ONLY_FOR, runs.check), from a shell."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, str(root / "eval.py"), "--ckpt", str(runs / "zero"), "--effrem_T", "32"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "--effrem_T" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_the_checkpoints_read_are_printed_scratch_runs_included(runs, tiny_corpus, tmp_path, capsys):
    """Without --ckpt every out/*/ckpt.pt is read, a scratch run too: the list is printed before any reading."""
    model = load_model(runs / "zero")
    for name in ("zero", "scratch"):
        save(model, tmp_path / "out" / name, args={"seq_len": 16, "init": "zero"}, step=7,
             corpus={"name": "tiny", "tokenizer": "bytes"})
    evaluation.main(["--len", "32", "--num_seqs", "1", "--bin_tokens", "0", "--data_dir", tiny_corpus[0],
                     "--out", str(tmp_path / "eval")])
    printed = capsys.readouterr().out
    listed = printed[:printed.index("mean loss")]  # before the results
    assert "no --ckpt" in listed
    for name in ("zero", "scratch"):
        assert str(Path("out") / name / "ckpt.pt") in listed
    read = json.loads((tmp_path / "eval" / "loss_vs_position.json").read_text())["checkpoints"]
    assert [c["label"] for c in read] == ["zero", "scratch"]
