"""Tests of eval.py: chunked reading is exact, the control and EffRem are what they claim, outputs are written,
passkey prompts are built and scored right, and errors are one clear line."""
import json

import pytest
import torch
import torch.nn.functional as F

import eval as evaluation
import train
from conftest import tiny_run_flags
from model import LM, ModelConfig

VOCAB = 40
NO_AUTOCAST = torch.autocast("cpu", enabled=False)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LM(ModelConfig(vocab_size=VOCAB, d_model=32, n_layer=2, mixer="mamba2", d_state=16, headdim=16,
                          chunk_size=16)).eval()


@pytest.fixture(scope="module")
def runs(tiny_corpus, tmp_path_factory):
    """Two tiny trained checkpoints (zero init, then state passing post-training)."""
    root = tmp_path_factory.mktemp("evalruns")
    assert train.main(tiny_run_flags(tiny_corpus, root / "zero")) is None
    flags = tiny_run_flags(tiny_corpus, root / "sp", "--init", "state_passing", "--init_from", str(root / "zero"),
                           "--max_steps", "2")
    for flag in ("--d_model", "--n_layer", "--d_state", "--headdim"):
        i = flags.index(flag)
        del flags[i:i + 2]
    assert train.main(flags) is None
    return root


def full_pass_losses(model, tokens):
    with torch.no_grad():
        logits, _, _ = model(tokens[:, :-1])
    return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")


@pytest.mark.parametrize("chunk", [1, 7, 16, 100])
def test_chunked_losses_equal_one_full_pass(model, chunk):
    tokens = torch.randint(0, VOCAB, (3, 51))
    chunked = evaluation.position_losses(model, tokens, chunk, "cpu", NO_AUTOCAST)
    assert torch.allclose(chunked, full_pass_losses(model, tokens), atol=1e-4)


def test_control_resets_the_state_every_T(model):
    tokens = torch.randint(0, VOCAB, (2, 45))
    control = evaluation.control_losses(model, tokens, 16, "cpu", NO_AUTOCAST)
    for start in (0, 16, 32):
        window = tokens[:, start:min(start + 17, 45)]
        assert torch.allclose(control[:, start:start + window.shape[1] - 1], full_pass_losses(model, window),
                              atol=1e-4)


def test_effrem_is_zero_at_t0_and_matches_a_direct_computation(model):
    tokens = torch.randint(0, VOCAB, (4, 40))
    values = evaluation.effective_remembrance(model, tokens, 32, [0, 5, 31], "cpu", NO_AUTOCAST)
    assert values[0] == 0.0
    with torch.no_grad():
        full = torch.softmax(model(tokens[:, :32])[0][:, -1], -1)
        partial = torch.softmax(model(tokens[:, 5:32])[0][:, -1], -1)
    direct = (0.5 * (full - partial).abs().sum(-1)).mean().item()
    assert values[1] == pytest.approx(direct, abs=1e-5) and 0 < values[1] <= 1


def test_state_statistics_match_the_state_after_each_position(model):
    tokens = torch.randint(0, VOCAB, (2, 60))
    stats = evaluation.state_statistics(model, tokens, [3, 20, 60], 16, "cpu", NO_AUTOCAST)
    with torch.no_grad():
        _, _, state = model(tokens[:, :20])
    expected = state.ssm[1].flatten(1)
    assert stats["norm"][1][1] == pytest.approx(expected.norm(dim=1).mean().item(), rel=1e-4)
    assert stats["std"][1][1] == pytest.approx(expected.std(dim=1).mean().item(), rel=1e-4)


def test_log_bins_cover_every_position_once():
    bins = evaluation.log_bins(1000, 20)
    assert bins[0][0] == 0 and bins[-1][1] == 1000
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(bins, bins[1:]))


def test_summary_bands():
    losses = torch.arange(64, dtype=torch.float32)[None].repeat(2, 1)  # loss = position
    s = evaluation.summary(losses, 4)
    assert s["[T/2,T)"] == pytest.approx(2.5) and s["[2T,8T)"] == pytest.approx(19.5)
    assert s["[8T,len)"] == pytest.approx(47.5)
    short = evaluation.summary(losses[:, :20], 4)  # 20 < 8 T: bands the sequence does not cover whole are left out
    assert short["[2T,8T)"] is None and short["[8T,len)"] is None and short["[T/2,T)"] == pytest.approx(2.5)


def test_passkey_prompt_and_scoring():
    from data import bytes_encoding

    enc = bytes_encoding()
    for depth in (0.0, 0.5, 1.0):
        ids = evaluation.passkey_prompt(enc, 2000, depth, 48213)
        text = enc.decode(ids)
        assert abs(len(ids) - 2000) < len(evaluation.PASSKEY_FILLER) and text.endswith(evaluation.PASSKEY_QUESTION)
        at = text.index("48213") / len(text)
        assert abs(at - depth) < 0.1
    assert evaluation.score_answer(" 48213. Remember", 48213)
    assert not evaluation.score_answer(" 4821", 48213) and not evaluation.score_answer(" 12345", 48213)


def test_evaluation_writes_figures_and_tables(runs, tiny_corpus, tmp_path, capsys):
    data_dir, _ = tiny_corpus
    out = tmp_path / "eval"
    evaluation.main(["--ckpt", str(runs / "zero"), "--ckpt", str(runs / "sp" / "ckpt.pt"), "--len", "96",
                     "--num_seqs", "2", "--chunk", "32", "--out", str(out), "--data_dir", data_dir, "--effrem",
                     "--state_stats", "--passkey", "--passkey_lengths", "64", "--passkey_trials", "1",
                     "--bins", "8"])
    for name in ("loss_vs_position.png", "loss_vs_position.csv", "effrem.png", "state_stats.png", "passkey.png"):
        assert (out / name).stat().st_size > 0
    record = json.loads((out / "loss_vs_position.json").read_text())
    assert record["len"] == 96 and len(record["sequence_starts"]) == 2
    assert [c["init"] for c in record["checkpoints"]] == ["zero", "state_passing"]
    for c in record["checkpoints"]:
        assert c["T"] == 16 and set(c["summary"]) == {"[T/2,T)", "[2T,8T)", "[8T,len)"}
        assert len(c["bins"]["loss"]) == len(c["bins"]["control"]) == len(c["bins"]["stderr"])
    effrem = json.loads((out / "effrem.json").read_text())["checkpoints"][0]
    assert effrem["T"] == 64 and effrem["effrem"][0] == 0.0
    printed = capsys.readouterr().out
    assert "[2T,8T)" in printed and "state_passing" in printed and str(out / "loss_vs_position.png") in printed


def test_every_checkpoint_reads_the_same_sequences(runs, tiny_corpus, tmp_path):
    data_dir, _ = tiny_corpus
    starts = []
    for ckpt in ("zero", "sp"):
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


def test_errors_are_one_line(runs, tiny_corpus, tmp_path, monkeypatch):
    data_dir, _ = tiny_corpus
    message = one_line_error(["--ckpt", str(runs / "zero"), "--len", "131072", "--data_dir", data_dir])
    assert "has" in message and "tokens, but 8 sequences of 131,073 tokens need 1,048,584" in message
    assert "lower --num_seqs or --len" in message
    assert "no checkpoint at" in one_line_error(["--ckpt", str(tmp_path / "missing"), "--data_dir", data_dir])
    assert "unrecognized arguments" in one_line_error(["--lenght", "10"])
    monkeypatch.chdir(tmp_path)
    assert "no checkpoints under out/" in one_line_error(["--data_dir", data_dir])


def test_device_and_effrem_errors_come_before_any_work(runs, tiny_corpus, monkeypatch):
    if not torch.cuda.is_available():
        assert "no CUDA GPU is visible" in one_line_error(["--ckpt", str(runs / "zero"), "--device", "cuda"])
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # as outside the tests: triton needs a GPU
        message = one_line_error(["--ckpt", str(runs / "zero"), "--device", "cpu", "--backend", "triton"])
        assert "--backend triton needs a CUDA device" in message
        monkeypatch.undo()
    assert "unknown --device" in one_line_error(["--ckpt", str(runs / "zero"), "--device", "tpu9"])
    message = one_line_error(["--ckpt", str(runs / "zero"), "--data_dir", tiny_corpus[0], "--len", "32",
                              "--effrem"])
    assert "EffRem with T=64 needs sequences of at least 64 tokens" in message


def test_reads_are_capped_for_large_vocabularies():
    assert evaluation.tokens_per_read(8192, 257) == 8192
    assert evaluation.tokens_per_read(8192, 50257) * 50257 <= evaluation.LOGITS_BUDGET


def test_passkey_with_keys_of_different_token_counts():
    """GPT-2 splits 5-digit keys into different numbers of tokens; prompts of unequal length must still work."""
    import data

    try:
        enc = data.get_tokenizer("gpt2")
    except data.DataError:
        pytest.skip("the gpt2 vocabulary is neither cached nor downloadable here")
    lengths = {len(evaluation.passkey_prompt(enc, 200, 0.5, key)) for key in range(10000, 10400, 7)}
    assert len(lengths) > 1  # the situation being tested really occurs
    model = LM(ModelConfig(vocab_size=enc.n_vocab, d_model=16, n_layer=1, mixer="gla", n_heads=2)).eval()
    accuracy = evaluation.passkey_accuracy(model, enc, [200], [0.5], 6, "cpu", NO_AUTOCAST, chunk=64)
    assert len(accuracy) == 1 and 0.0 <= accuracy[0][0] <= 1.0


def test_checkpoints_with_different_vocabularies_are_refused(runs, tiny_corpus, tmp_path):
    ckpt = train.load_checkpoint(runs / "zero")
    ckpt["model_config"] = {**ckpt["model_config"], "vocab_size": 300}
    ckpt["model"] = train.LM(ModelConfig(**ckpt["model_config"])).state_dict()
    train.save_checkpoint(tmp_path / "other", ckpt)
    message = one_line_error(["--ckpt", str(runs / "zero"), "--ckpt", str(tmp_path / "other"),
                              "--data_dir", tiny_corpus[0], "--len", "64", "--num_seqs", "1"])
    assert "cannot be compared on the same text" in message
