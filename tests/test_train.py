"""Tests of train.py: every intervention trains, runs resume exactly, two processes train together, errors are
one clear line."""
import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from conftest import tiny_run_flags
from interventions import INITS
from model import CHECKPOINT_FORMAT, save_checkpoint

ARCHITECTURE_FLAGS = {"--d_model", "--n_layer", "--d_state", "--headdim"}


def post_flags(flags):
    """The same flags without the architecture, which a post-training run takes from its checkpoint."""
    out, skip = [], False
    for x in flags:
        if skip:
            skip = False
        elif x in ARCHITECTURE_FLAGS:
            skip = True
        else:
            out.append(x)
    return out


def run_main(argv):
    """train.main in this process; returns the one-line error of a failed run, or None."""
    try:
        train.main(argv)
    except SystemExit as exit_info:
        return str(exit_info.code)
    return None


def read_log(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base_run(tiny_corpus, tmp_path_factory):
    """A 4-step pre-trained (zero init) checkpoint folder."""
    out = tmp_path_factory.mktemp("runs") / "zero"
    assert run_main(tiny_run_flags(tiny_corpus, out)) is None
    return out


def test_pretraining_writes_checkpoint_and_log(base_run):
    ckpt = train.load_checkpoint(base_run)
    assert ckpt["step"] == 4 and ckpt["args"]["init"] == "zero" and ckpt["args"]["seq_len"] == 16
    log = read_log(base_run)
    assert [r["step"] for r in log if "train_loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in log if "val_loss" in r] == [2, 4]
    assert all(r["val_loss"] > 0 and r["val_loss_beyond_T"] > 0 for r in log if "val_loss" in r)


@pytest.mark.parametrize("init", [i for i in INITS if i != "zero"] + ["zero"])
def test_post_training_with_every_intervention(tiny_corpus, base_run, tmp_path, init):
    out = tmp_path / init
    mix = [] if init == "zero" else ["--p_zero", "0.25"]
    flags = post_flags(tiny_run_flags(tiny_corpus, out, "--init", init, "--init_from", str(base_run),
                                      "--max_steps", "2", *mix))
    assert run_main(flags) is None
    ckpt = train.load_checkpoint(out)
    assert ckpt["step"] == 2 and ckpt["args"]["init"] == init and ckpt["args"]["init_from"] == str(base_run)
    assert ckpt["model_config"] == train.load_checkpoint(base_run)["model_config"]
    base_weights = train.load_checkpoint(base_run)["model"]
    assert any(not torch.equal(v, base_weights[k]) for k, v in ckpt["model"].items())  # it trained


def test_intervention_during_pretraining(tiny_corpus, tmp_path):
    out = tmp_path / "sp"
    assert run_main(tiny_run_flags(tiny_corpus, out, "--init", "state_passing", "--from_scratch")) is None
    assert train.load_checkpoint(out)["args"]["init_from"] is None


def test_one_command_recipe_pretrains_the_base_first(tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = [x for x in tiny_run_flags(tiny_corpus, tmp_path / "unused") if True]
    i = flags.index("--out_dir")
    del flags[i:i + 2]
    assert run_main(flags + ["--init", "fitted_noise"]) is None
    assert train.load_checkpoint(tmp_path / "out" / "zero")["args"]["init"] == "zero"
    post = train.load_checkpoint(tmp_path / "out" / "fitted_noise")
    assert post["args"]["init_from"] == os.path.join("out", "zero")


@pytest.mark.parametrize("init", ["zero", "state_passing", "tbptt", "fitted_noise"])
def test_resume_is_exact(tiny_corpus, base_run, tmp_path, init):
    """4 steps in one go == 2 steps, stop, resume for 2 more: identical weights and optimizer state."""
    extra = ["--init", init] + ([] if init == "zero" else ["--init_from", str(base_run), "--max_steps", "4",
                                                            "--p_zero", "0.3"])
    flags = lambda out: (tiny_run_flags(tiny_corpus, out, *extra) if init == "zero"
                         else post_flags(tiny_run_flags(tiny_corpus, out, *extra)))
    assert run_main(flags(tmp_path / "whole")) is None
    assert run_main(flags(tmp_path / "split") + ["--stop_at", "2"]) is None
    assert train.load_checkpoint(tmp_path / "split")["step"] == 2
    assert run_main(["--resume", "--out_dir", str(tmp_path / "split")]) is None
    whole, split = train.load_checkpoint(tmp_path / "whole"), train.load_checkpoint(tmp_path / "split")
    assert split["step"] == 4
    for key, value in whole["model"].items():
        assert torch.equal(value, split["model"][key]), key
    for a, b in zip(whole["optimizer"]["state"].values(), split["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])


def test_two_process_gloo_run(tiny_corpus, tmp_path):
    out = tmp_path / "ddp"
    flags = tiny_run_flags(tiny_corpus, out, "--init", "state_passing", "--from_scratch", "--max_steps", "2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", *flags], cwd=Path(train.__file__).parent, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = train.load_checkpoint(out)
    assert ckpt["step"] == 2 and len(ckpt["ranks"]) == 2
    # every rank keeps its own passed states: different data, so different states
    passed = [r["intervention"]["previous"]["ssm"][0] for r in ckpt["ranks"]]
    assert not torch.equal(passed[0], passed[1])


@pytest.mark.parametrize("extra,message", [
    (["--init", "warm_start"], "invalid choice: 'warm_start'"),
    (["--mixer", "transformer"], "invalid choice: 'transformer'"),
    (["--init", "state_passing", "--noise_std", "0.2"], "--noise_std only applies to --init random_noise"),
    (["--ssm_only"], "--ssm_only only applies to"),
    (["--p_zero", "1.5"], "--p_zero must be in [0, 1]"),
    (["--init", "tbptt", "--init_from", "x", "--from_scratch"], "contradict each other"),
    (["--seq_len", "0"], "--seq_len must be at least 1"),
])
def test_bad_flags_exit_with_one_line(tiny_corpus, tmp_path, extra, message):
    error = run_main(tiny_run_flags(tiny_corpus, tmp_path / "x", *extra))
    assert error is not None and message in error and "\n" not in error


def test_missing_data_is_a_clear_error(tmp_path):
    error = run_main(["--data", "no_such_corpus", "--data_dir", str(tmp_path), "--out_dir", str(tmp_path / "x")])
    assert "no prepared corpus 'no_such_corpus'" in error and "python data.py --input" in error


def test_checkpoint_errors(tiny_corpus, base_run, tmp_path):
    error = run_main(["--resume", "--out_dir", str(tmp_path / "nothing_here")])
    assert "no checkpoint at" in error
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "ckpt.pt").write_bytes(b"not a checkpoint at all")
    error = run_main(["--resume", "--out_dir", str(tmp_path / "corrupt")])
    assert "is not a readable checkpoint" in error and "\n" not in error
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    error = run_main(post_flags(tiny_run_flags(tiny_corpus, tmp_path / "y", "--init", "tbptt",
                                               "--init_from", str(tmp_path / "foreign.pt"))))
    assert "is not a checkpoint of this project" in error
    error = run_main(tiny_run_flags(tiny_corpus, tmp_path / "z", "--init", "tbptt", "--init_from", str(base_run),
                                    "--d_model", "64"))
    assert "--d_model 64 would change" in error


def test_resume_refuses_changed_training_flags(tiny_corpus, base_run):
    error = run_main(["--resume", "--out_dir", str(base_run), "--lr", "0.5"])
    assert "--lr differ from it" in error


def test_post_training_needs_the_same_vocabulary(base_run, tmp_path):
    import data

    (tmp_path / "t.txt").write_text("some text " * 3000)
    data.prepare(tmp_path / "t.txt", name="other", data_dir=tmp_path, tokenizer="bytes")
    meta_path = tmp_path / "other" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["vocab_size"] = 300  # as if another tokenizer had made it
    meta_path.write_text(json.dumps(meta))
    error = run_main(["--init", "tbptt", "--init_from", str(base_run), "--data", "other", "--data_dir",
                      str(tmp_path), "--out_dir", str(tmp_path / "o"), "--device", "cpu"])
    assert "vocabulary of 257 tokens" in error and "has 300" in error


def patch_step(monkeypatch, at_step, action):
    """Make train.py's step run action(run) after its real work when it has reached step at_step."""
    real_step = train.train_step

    def step(run):
        loss, lr = real_step(run)
        return action(run, loss, lr) if run.step == at_step else (loss, lr)

    monkeypatch.setattr(train, "train_step", step)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_corpus, tmp_path, monkeypatch):
    patch_step(monkeypatch, 3, lambda run, loss, lr: (float("nan"), lr))
    error = run_main(tiny_run_flags(tiny_corpus, tmp_path / "nan"))
    assert "loss became nan at step 3" in error and "the last good checkpoint (step 2)" in error
    assert train.load_checkpoint(tmp_path / "nan")["step"] == 2


def test_weights_that_are_not_finite_are_never_saved(tiny_corpus, tmp_path, monkeypatch):
    def break_weights(run, loss, lr):
        with torch.no_grad():
            run.model.backbone.norm_f.weight[0] = float("inf")
        return loss, lr  # the loss was computed before the update: finite

    patch_step(monkeypatch, 4, break_weights)
    error = run_main(tiny_run_flags(tiny_corpus, tmp_path / "inf"))
    assert "the weight backbone.norm_f.weight is not finite after step 4" in error
    assert "the last good checkpoint (step 2) in" in error and "\n" not in error
    assert train.load_checkpoint(tmp_path / "inf")["step"] == 2
    # a learning rate that blows the weights up in one step: nothing good to save, and it says so
    error = run_main(tiny_run_flags(tiny_corpus, tmp_path / "huge", "--lr", "1e6", "--max_steps", "1"))
    assert "is not finite after step 1" in error and "no checkpoint was written" in error
    assert not (tmp_path / "huge" / "ckpt.pt").exists()


@pytest.mark.parametrize("how,saved_step", [("signal", 3), ("exception", 2)])
def test_ctrl_c_stops_at_a_step_boundary_and_resumes_exactly(tiny_corpus, tmp_path, monkeypatch, capsys, how,
                                                              saved_step):
    """A Ctrl-C (SIGINT) during step 3 lets the step finish, saves it and stops; a KeyboardInterrupt raised in the
    middle of step 3 (a second Ctrl-C) loses that step and keeps the checkpoint of step 2. Either way --resume
    reaches the weights of an uninterrupted run."""
    import signal

    assert run_main(tiny_run_flags(tiny_corpus, tmp_path / "whole")) is None

    def interrupt(run, loss, lr):
        if how == "exception":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGINT)
        return loss, lr

    with monkeypatch.context() as patch:
        patch_step(patch, 3, interrupt)
        assert run_main(tiny_run_flags(tiny_corpus, tmp_path / "split")) == "130"
    message = capsys.readouterr().err.strip().splitlines()[-1]
    if how == "signal":
        assert message == f"train.py: stopped at step 3; continue with python train.py --resume --out_dir " \
                          f"{tmp_path / 'split'}"
    else:
        assert "interrupted after step 3; stopped without saving: the last good checkpoint (step 2)" in message
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    assert train.load_checkpoint(tmp_path / "split")["step"] == saved_step
    assert run_main(["--resume", "--out_dir", str(tmp_path / "split")]) is None
    whole, split = train.load_checkpoint(tmp_path / "whole"), train.load_checkpoint(tmp_path / "split")
    for key, value in whole["model"].items():
        assert torch.equal(value, split["model"][key]), key
    steps = [r["step"] for r in read_log(tmp_path / "split") if "train_loss" in r]
    assert steps == [1, 2, 3, 4]


def test_checkpoints_are_written_atomically(tmp_path):
    save_checkpoint(tmp_path / "run", {"format": CHECKPOINT_FORMAT, "model": {"x": torch.ones(3)}})
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["ckpt.pt"]  # no temporary file left


def test_learning_rate_schedule():
    args = type("A", (), dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110))()
    assert train.lr_at(0, args) == pytest.approx(0.1) and train.lr_at(9, args) == pytest.approx(1.0)
    assert train.lr_at(60, args) == pytest.approx(0.55) and train.lr_at(110, args) == pytest.approx(0.1)


def test_help_documents_every_flag():
    text = train.build_parser().format_help()
    for flag in ("--init", "--noise_std", "--p_zero", "--mixer", "--d_model", "--n_layer", "--seq_len",
                 "--batch_size", "--max_steps", "--data", "--out_dir", "--resume", "--init_from", "--device"):
        assert flag in text


def test_resume_can_extend_a_finished_run(tiny_corpus, tmp_path):
    out = tmp_path / "extend"
    assert run_main(tiny_run_flags(tiny_corpus, out)) is None
    assert run_main(["--resume", "--out_dir", str(out), "--max_steps", "6"]) is None
    assert train.load_checkpoint(out)["step"] == 6
    steps = [r["step"] for r in read_log(out) if "train_loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # each step logged once


def test_resume_drops_log_lines_of_lost_steps(tiny_corpus, tmp_path):
    out = tmp_path / "lost"
    assert run_main(tiny_run_flags(tiny_corpus, out, "--stop_at", "2")) is None
    with open(out / "log.jsonl", "a") as f:  # as if step 3 had been trained and logged, then the process died
        f.write(json.dumps({"step": 3, "train_loss": 9.9}) + "\n")
    assert run_main(["--resume", "--out_dir", str(out)]) is None
    steps = [r["step"] for r in read_log(out) if "train_loss" in r]
    assert steps == [1, 2, 3, 4] and all(r["train_loss"] != 9.9 for r in read_log(out) if "train_loss" in r)


def test_resume_refuses_another_device_type_or_process_count(tiny_corpus, base_run, tmp_path):
    ckpt = train.load_checkpoint(base_run)
    moved = {**ckpt, "ranks": [{**ckpt["ranks"][0], "intervention": {**ckpt["ranks"][0]["intervention"],
                                                                        "generator_device": "cuda:0"}}]}
    save_checkpoint(tmp_path / "moved", moved)
    assert "resume it on a cuda device" in run_main(["--resume", "--out_dir", str(tmp_path / "moved")])
    doubled = {**ckpt, "ranks": ckpt["ranks"] * 2}
    save_checkpoint(tmp_path / "doubled", doubled)
    assert "--nproc_per_node=2" in run_main(["--resume", "--out_dir", str(tmp_path / "doubled")])


def test_existing_runs_are_never_overwritten_silently(tiny_corpus, base_run, tmp_path):
    error = run_main(tiny_run_flags(tiny_corpus, base_run))
    assert "already holds a run: --resume to continue it, --overwrite to start over" in error
    error = run_main(post_flags(tiny_run_flags(tiny_corpus, base_run, "--init", "zero", "--init_from",
                                               str(base_run), "--overwrite")))
    assert "into itself would overwrite it" in error
    out = tmp_path / "again"
    assert run_main(tiny_run_flags(tiny_corpus, out)) is None
    assert run_main(tiny_run_flags(tiny_corpus, out, "--overwrite", "--max_steps", "2")) is None
    assert [r["step"] for r in read_log(out) if "train_loss" in r] == [1, 2]  # a new log, not an appended one


def test_post_training_keeps_the_base_training_length(tiny_corpus, base_run, tmp_path):
    flags = post_flags(tiny_run_flags(tiny_corpus, tmp_path / "p", "--init", "tbptt", "--init_from", str(base_run),
                                      "--max_steps", "1"))
    i = flags.index("--seq_len")
    del flags[i:i + 2]  # the preset says 64; the base was trained at 16
    assert run_main(flags) is None
    assert train.load_checkpoint(tmp_path / "p")["args"]["seq_len"] == 16


@pytest.mark.parametrize("extra,message", [
    (["--d_model", "30"], "multiple of headdim"),
    (["--chunk_size", "0"], "--chunk_size must be at least 1"),
    (["--log_interval", "0"], "--log_interval must be at least 1"),
    (["--device", "tpu9"], "unknown --device"),
    (["--d_state", "256", "--backend", "triton"], "--backend triton: the triton backend needs P, N <= 128"),
    (["--p_zero", "0.1"], "--p_zero does not apply to --init zero"),
    (["--lr", "nan"], "--lr must be a finite number above 0; got nan"),
    (["--lr", "-1"], "--lr must be a finite number above 0"),
    (["--lr", "inf"], "--lr must be a finite number above 0"),
    (["--weight_decay", "-1"], "--weight_decay must be a finite number of at least 0"),
    (["--init", "random_noise", "--from_scratch", "--noise_std", "-1"], "--noise_std must be a finite number"),
    (["--d_state", "0"], "--d_state must be at least 1"),
    (["--headdim", "0"], "--headdim must be at least 1"),
    (["--n_heads", "0"], "--n_heads must be at least 1"),
    (["--expand", "0"], "--expand must be at least 1"),
    (["--dt_min", "-1"], "--dt_min must be a finite number above 0"),
    (["--dt_min", "0.5", "--dt_max", "0.1"], "dt_min = 0.5 is above dt_max = 0.1"),
    (["--stop_at", "0"], "--stop_at must be at least 1"),
    (["--stop_at", "-1"], "--stop_at must be at least 1"),
    (["--device", "mps"], "--device mps: no such device is usable here"),
])
def test_more_bad_flags_exit_with_one_line(tiny_corpus, tmp_path, extra, message):
    error = run_main(tiny_run_flags(tiny_corpus, tmp_path / "x", *extra))
    assert error is not None and message in error and "\n" not in error


def test_unfinished_base_run_is_not_post_trained(tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = tiny_run_flags(tiny_corpus, tmp_path / "out" / "zero", "--stop_at", "2")
    assert run_main(flags) is None
    error = run_main(["--init", "state_passing", "--data", tiny_corpus[1], "--data_dir", tiny_corpus[0]])
    assert "stopped at step 2 of 4" in error and "--resume --out_dir" in error


def test_too_few_validation_tokens_names_train_flags(tiny_corpus, tmp_path):
    error = run_main(tiny_run_flags(tiny_corpus, tmp_path / "x", "--eval_seqs", "100000"))
    assert "lower --eval_seqs or --seq_len" in error


def test_one_command_recipe_under_torchrun(tiny_corpus, tmp_path):
    """The automatic pre-training and the post-training share one process group (this used to deadlock)."""
    flags = [x for x in tiny_run_flags(tiny_corpus, "unused", "--max_steps", "2")]
    i = flags.index("--out_dir")
    del flags[i:i + 2]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(Path(train.__file__)), *flags, "--init", "state_passing", "--base_steps", "4"],
                            cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert train.load_checkpoint(tmp_path / "out" / "zero")["step"] == 4
    post = train.load_checkpoint(tmp_path / "out" / "state_passing")
    assert post["step"] == 2 and len(post["ranks"]) == 2


def test_files_in_the_way_are_one_line_errors(tiny_corpus, tmp_path):
    (tmp_path / "a_file").write_text("x")
    error = run_main(tiny_run_flags(tiny_corpus, tmp_path / "a_file"))
    assert "--out_dir" in error and "is a file: give a folder" in error
    for data in ("stdlib", tiny_corpus[1]):  # the default corpus (prepared on first use) and a named one
        error = run_main(["--data", data, "--data_dir", str(tmp_path / "a_file"), "--out_dir", str(tmp_path / "o")])
        assert error.startswith("train.py: error: ") and "a_file" in error and "\n" not in error


def test_incomplete_checkpoints_are_one_line_errors(tiny_corpus, tmp_path):
    save_checkpoint(tmp_path / "bare", {"format": CHECKPOINT_FORMAT, "model": {}})
    error = run_main(["--resume", "--out_dir", str(tmp_path / "bare")])
    assert "is incomplete (no args)" in error
    error = run_main(post_flags(tiny_run_flags(tiny_corpus, tmp_path / "p", "--init", "tbptt", "--init_from",
                                               str(tmp_path / "bare"))))
    assert "is incomplete (no model_config)" in error


def test_resume_refuses_a_corpus_prepared_again(tiny_corpus, tmp_path):
    import data

    (tmp_path / "t.txt").write_text("def f(x):\n    return x\n" * 2000)
    data.prepare(tmp_path / "t.txt", name="mine", data_dir=tmp_path / "data")
    flags = tiny_run_flags((str(tmp_path / "data"), "mine"), tmp_path / "run", "--stop_at", "2")
    assert run_main(flags) is None
    data.prepare(tmp_path / "t.txt", name="mine", data_dir=tmp_path / "data")  # the same text, prepared again
    error = run_main(["--resume", "--out_dir", str(tmp_path / "run")])
    assert "corpus 'mine' was prepared again after the run" in error and "--init_from" in error


def test_resume_drops_a_torn_log_line(tiny_corpus, tmp_path):
    out = tmp_path / "torn"
    assert run_main(tiny_run_flags(tiny_corpus, out, "--stop_at", "2")) is None
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "train_lo')  # the process died while writing
    assert run_main(["--resume", "--out_dir", str(out)]) is None
    assert [r["step"] for r in read_log(out) if "train_loss" in r] == [1, 2, 3, 4]


def test_offline_default_corpus_says_what_train_py_users_can_do(tmp_path, monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    error = run_main(["--preset", "paper", "--data_dir", str(tmp_path), "--out_dir", str(tmp_path / "o"),
                      "--device", "cpu"])
    assert "TIKTOKEN_CACHE_DIR" in error and "--data stdlib" in error and "--tokenizer" not in error


def test_start_and_end_lines_say_what_happens(tiny_corpus, tmp_path, capsys):
    assert run_main(tiny_run_flags(tiny_corpus, tmp_path / "r", "--grad_accum", "2")) is None
    out, err = capsys.readouterr()
    assert "8 sequences of 16 tokens per step (4 x 2 micro-batches x 1 processes)" in err
    assert out.strip().splitlines()[-1] == (f"train.py: done: {tmp_path / 'r' / 'ckpt.pt'} (step 4); next: python "
                                            f"eval.py --ckpt {tmp_path / 'r'}")


def test_memory_estimate_grows_with_the_run_and_refuses_what_cannot_fit(tiny_corpus, tmp_path, monkeypatch):
    from argparse import Namespace

    from model import LM, ModelConfig

    def estimate(d_model=32, batch_size=4, seq_len=64, mixer="mamba2"):
        model = LM(ModelConfig(vocab_size=257, d_model=d_model, n_layer=2, mixer=mixer, d_state=16, headdim=16,
                               chunk_size=16))
        args = Namespace(batch_size=batch_size, seq_len=seq_len)
        return train.estimate_memory(model, args, torch.device("cpu"), contextlib.nullcontext())

    base = estimate()
    assert estimate(batch_size=8) > base and estimate(seq_len=128) > base and estimate(d_model=64) > base
    # activations scale with the tokens of a micro-batch: twice the rows, twice the activation bytes
    weights_and_optimizer = estimate(batch_size=1) - (estimate(batch_size=2) - estimate(batch_size=1))
    assert estimate(batch_size=8) - weights_and_optimizer == pytest.approx(8 * (base - weights_and_optimizer) / 4)
    assert estimate(mixer="gla") > 0
    monkeypatch.setattr(train, "available_memory", lambda device: 2 ** 10)  # 1 KiB
    error = run_main(tiny_run_flags(tiny_corpus, tmp_path / "big"))
    assert "GiB more memory on cpu but 0.0 GiB are available: lower --batch_size" in error
    assert not (tmp_path / "big" / "ckpt.pt").exists()


def task_flags(out_dir, *extra):
    return ["--task", "copy", "--out_dir", str(out_dir), "--d_model", "32", "--n_layer", "1", "--d_state", "16",
            "--headdim", "16", "--batch_size", "4", "--eval_seqs", "2", "--eval_interval", "2", "--log_interval", "1",
            "--max_steps", "4", "--chunk_size", "16", "--device", "cpu", *extra]


def test_a_synthetic_task_trains_through_the_same_loop(tmp_path):
    """--task copy: pre-training from zero, post-training with state passing, validation on held-out examples."""
    assert run_main(task_flags(tmp_path / "zero", "--alphabet_size", "26", "--n_train", "32", "--context", "0")) is None
    base = train.load_checkpoint(tmp_path / "zero")
    assert base["step"] == 4 and base["args"]["seq_len"] == 67 and base["corpus"]["task"] == "copy"
    assert base["model_config"]["vocab_size"] == 29  # 26 letters and start, copy, end
    val = [r["val_loss"] for r in read_log(tmp_path / "zero") if "val_loss" in r]
    assert len(val) == 2 and all(0 < v < 5 for v in val)  # a masked cross-entropy over 29 tokens: log 29 = 3.4
    flags = post_flags(task_flags(tmp_path / "sp", "--init", "state_passing", "--init_from", str(tmp_path / "zero"),
                                  "--max_steps", "2"))
    assert run_main(flags) is None
    post = train.load_checkpoint(tmp_path / "sp")
    assert post["step"] == 2 and post["args"]["task"] == "copy"
    assert (post["args"]["alphabet_size"], post["args"]["n_train"], post["args"]["seq_len"]) == (26, 32, 67)
    assert post["ranks"][0]["intervention"]["previous"]["ssm"][0].abs().sum() > 0  # it passed real states
    assert any(not torch.equal(v, base["model"][k]) for k, v in post["model"].items())
    error = run_main(task_flags(tmp_path / "x", "--seq_len", "32"))
    assert "--task copy makes its own examples; drop --data and --seq_len" in error


def test_a_synthetic_task_resumes_exactly(tmp_path):
    flags = lambda out: task_flags(out, "--init", "state_passing", "--from_scratch")  # noqa: E731
    assert run_main(flags(tmp_path / "whole")) is None
    assert run_main(flags(tmp_path / "split") + ["--stop_at", "3"]) is None
    assert run_main(["--resume", "--out_dir", str(tmp_path / "split")]) is None
    whole, split = train.load_checkpoint(tmp_path / "whole"), train.load_checkpoint(tmp_path / "split")
    for key, value in whole["model"].items():
        assert torch.equal(value, split["model"][key]), key


def official_layout_folder(folder, vocab_size):
    """A small Mamba-2 written as mamba_ssm writes its official checkpoints (config.json and pytorch_model.bin)."""
    from model import LM, ModelConfig
    from test_pretrained import MAMBA_SSM_CONFIG, write_mamba_ssm

    config = {**MAMBA_SSM_CONFIG, "vocab_size": vocab_size}
    ssm = config["ssm_cfg"]
    model = LM(ModelConfig(vocab_size=vocab_size, d_model=config["d_model"], n_layer=config["n_layer"],
                           mixer="mamba2", d_state=ssm["d_state"], headdim=ssm["headdim"], ngroups=ssm["ngroups"],
                           pad_vocab_multiple=16, mlp=False))
    return write_mamba_ssm(folder, model.state_dict(), config), model


def test_post_training_a_model_in_the_official_layout(tiny_corpus, tmp_path, monkeypatch):
    """--init_from a folder that pretrained.py reads: the architecture is the folder's, T the one it was trained
    at (here as if its files said 24), the optimizer fresh."""
    from model import LM

    folder, original = official_layout_folder(tmp_path / "official", vocab_size=300)
    real = LM.from_pretrained

    def trained_at_24(name, *args, **kwargs):
        model = real(name, *args, **kwargs)
        model.trained_on["seq_len"] = 24
        return model

    monkeypatch.setattr(LM, "from_pretrained", trained_at_24)
    flags = post_flags(tiny_run_flags(tiny_corpus, tmp_path / "post", "--init", "state_passing", "--init_from",
                                      str(folder), "--max_steps", "2"))
    i = flags.index("--seq_len")
    del flags[i:i + 2]
    assert run_main(flags) is None
    ckpt = train.load_checkpoint(tmp_path / "post")
    assert ckpt["step"] == 2 and ckpt["args"]["seq_len"] == 24 and ckpt["args"]["init_from"] == str(folder)
    cfg = ckpt["model_config"]
    assert (cfg["d_model"], cfg["n_layer"], cfg["ngroups"], cfg["vocab_size"], cfg["pad_vocab_multiple"]) == \
        (32, 2, 2, 300, 16)
    assert any(not torch.equal(v, original.state_dict()[k]) for k, v in ckpt["model"].items())
    # a model trained on other tokens, or on fewer, cannot read the corpus
    def trained_on_other_tokens(name, *args, **kwargs):
        model = real(name, *args, **kwargs)
        model.trained_on["tokenizer"] = "EleutherAI/gpt-neox-20b"
        return model

    monkeypatch.setattr(LM, "from_pretrained", trained_on_other_tokens)
    error = run_main([str(tmp_path / "p1") if x == str(tmp_path / "post") else x for x in flags])
    assert "the corpus was tokenised by bytes, the model by EleutherAI/gpt-neox-20b" in error
    assert "python data.py --input PATH --tokenizer EleutherAI/gpt-neox-20b" in error
    monkeypatch.setattr(LM, "from_pretrained", real)
    small, _ = official_layout_folder(tmp_path / "small", vocab_size=100)
    error = run_main(post_flags(tiny_run_flags(tiny_corpus, tmp_path / "p2", "--init", "tbptt", "--init_from",
                                               str(small))))
    assert "vocabulary of 100 tokens but the corpus has 257" in error and "\n" not in error


def test_presets_of_the_official_models_post_train_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("mamba2-130m", "mamba2-370m", "mamba2-780m", "mamba2-1.3b"):
        preset = train.PRESETS[name]
        assert preset["init_from"] == f"state-spaces/{name}" and preset["train"]["seq_len"] == 2048
        assert preset["train"]["batch_size"] * preset["train"]["grad_accum"] == 256  # 0.5M tokens per step
        args = train.build_parser().parse_args(["--preset", name, "--init", "state_passing"])
        assert not train.needs_base_run(args)  # no automatic pre-training of out/zero: the model is the base


def test_an_official_model_named_by_init_from_brings_its_preset(tmp_path, monkeypatch):
    """--init_from state-spaces/mamba2-370m without --preset post-trains with that model's preset (0.5M tokens per
    step, its learning rate), not with the demo's; an explicit --preset still wins."""
    monkeypatch.chdir(tmp_path)
    folder, _ = official_layout_folder(tmp_path / "official", vocab_size=300)
    from model import LM

    real = LM.from_pretrained
    monkeypatch.setattr(train, "load_base", lambda name: (real(folder).train(), {"seq_len": 2048}))
    parser = train.build_parser()
    argv = ["--init", "state_passing", "--init_from", "state-spaces/mamba2-370m"]
    args, _ = train.resolve_args(parser.parse_args(argv), {"init", "init_from"})
    assert args.preset == "mamba2-370m" and args.batch_size * args.grad_accum == 256 and args.lr == 3e-4
    args, _ = train.resolve_args(parser.parse_args(argv + ["--preset", "demo"]), {"init", "init_from", "preset"})
    assert args.preset == "demo" and args.batch_size * args.grad_accum == 16


def test_a_task_alone_brings_its_preset_and_bad_task_settings_are_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, _ = train.resolve_args(train.build_parser().parse_args(["--task", "copy"]), {"task"})
    assert (args.preset, args.seq_len, args.d_model, args.n_layer, args.max_steps) == ("copy", 64, 128, 2, 1000)
    assert args.out_dir == os.path.join("out", "copy", "zero")
    for extra, message in ((["--alphabet_size", "1"], "--task copy: the copy task needs alphabet_size >= 2"),
                           (["--n_train", "40"], "cannot hold the longest example"),
                           (["--context", "-1"], "--context must be at least 0")):
        error = run_main(task_flags(tmp_path / "bad", *extra))
        assert message in error and "\n" not in error


# ----------------------------------------------------------------------------------------------------------------
# --task passkey: fine-tuning a language model on passkey examples in its own tokenizer
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    """A 2-step pre-trained LM on a corpus prepared with a small BPE tokenizer.json: (run folder, tokenizer file)."""
    import data
    from test_data import train_bpe

    root = tmp_path_factory.mktemp("bpe_model")
    tokenizer = train_bpe(root / "bpe")
    (root / "words.txt").write_text("".join(f"The sky is blue on day {i}. The grass is green.\n" for i in range(400)))
    data.prepare(root / "words.txt", name="words", tokenizer=str(tokenizer), data_dir=root / "data")
    out = root / "lm"
    flags = tiny_run_flags((str(root / "data"), "words"), out, "--max_steps", "2")
    assert run_main(flags) is None
    return out, tokenizer


def passkey_flags(out_dir, *extra):
    return ["--task", "passkey", "--out_dir", str(out_dir), "--batch_size", "2", "--eval_seqs", "2",
            "--eval_interval", "2", "--log_interval", "1", "--max_steps", "2", "--device", "cpu", *extra]


def test_passkey_fine_tunes_a_model_in_its_own_tokenizer(bpe_model, tmp_path):
    """--task passkey --init fitted_noise --init_from an LM: examples of up to 2048 tokens in the tokenizer of the
    LM's corpus, the loss on the answer only, the tokenizer recorded as a corpus's would be."""
    import data
    from model import LM
    from tasks import PasskeyTask

    base, tokenizer_file = bpe_model
    out = tmp_path / "fitted_noise"
    assert run_main(passkey_flags(out, "--init", "fitted_noise", "--init_from", str(base))) is None
    ckpt, base_ckpt = train.load_checkpoint(out), train.load_checkpoint(base)
    assert ckpt["step"] == 2 and ckpt["args"]["task"] == "passkey" and ckpt["args"]["seq_len"] == 2048
    assert ckpt["corpus"]["tokenizer"] == base_ckpt["corpus"]["tokenizer"] == str(tokenizer_file.resolve())
    assert ckpt["corpus"]["tokenizer_sha256"] == base_ckpt["corpus"]["tokenizer_sha256"] is not None
    assert ckpt["model_config"]["vocab_size"] == base_ckpt["model_config"]["vocab_size"] == 400
    assert any(not torch.equal(v, base_ckpt["model"][k]) for k, v in ckpt["model"].items())
    assert LM.from_checkpoint(ckpt).trained_on["tokenizer_sha256"] == base_ckpt["corpus"]["tokenizer_sha256"]
    # the validation loss is the cross-entropy of the answers (" 12345.") alone, recomputed here by hand
    args = train.argparse.Namespace(**ckpt["args"])
    batches = train.TaskBatches(train.build_task(args), args, seed=0)
    model, tokenizer, losses = LM.from_checkpoint(ckpt), data.get_tokenizer(str(tokenizer_file)), []
    for inputs, targets in batches.val_batches:
        assert isinstance(batches.task, PasskeyTask) and inputs.shape[1] <= 2048
        for row, row_targets in zip(inputs, targets):
            n = int((row_targets >= 0).sum())  # the answer's tokens, the last of the row
            assert re.fullmatch(r" \d{5}\.", tokenizer.decode(row[-n:].tolist()))
            assert torch.equal(row_targets[-n - 1:-1], row[-n:]) and (row_targets[:-n - 1] == -1).all()
            logits = model(row[None])[0][0, -n - 1:-1]
            losses.append(torch.nn.functional.cross_entropy(logits, row[-n:], reduction="none"))
    val = [r["val_loss"] for r in read_log(out) if "val_loss" in r]
    assert len(val) == 1 and val[0] == pytest.approx(torch.cat(losses).mean().item(), rel=1e-5)  # float32 sums


def test_passkey_resumes_exactly_and_defaults_to_the_paper_recipe(bpe_model, tmp_path, monkeypatch):
    base, _ = bpe_model
    flags = lambda out: passkey_flags(out, "--init", "state_passing", "--init_from", str(base),  # noqa: E731
                                      "--max_steps", "3", "--eval_interval", "3")
    assert run_main(flags(tmp_path / "whole")) is None
    assert run_main(flags(tmp_path / "split") + ["--stop_at", "1"]) is None
    assert run_main(["--resume", "--out_dir", str(tmp_path / "split")]) is None
    whole, split = train.load_checkpoint(tmp_path / "whole"), train.load_checkpoint(tmp_path / "split")
    for key, value in whole["model"].items():
        assert torch.equal(value, split["model"][key]), key
    assert split["corpus"] == whole["corpus"]
    monkeypatch.chdir(tmp_path)
    args, _ = train.resolve_args(train.build_parser().parse_args(["--task", "passkey", "--init_from", str(base)]),
                                 {"task", "init_from"})
    assert (args.max_steps, args.seq_len, args.out_dir) == (1000, 2048, os.path.join("out", "passkey", "zero"))


def test_passkey_on_an_official_model_takes_its_preset_and_byte_models_their_bytes(tiny_corpus, base_run, tmp_path,
                                                                                   monkeypatch):
    folder, _ = official_layout_folder(tmp_path / "official", vocab_size=300)
    from model import LM

    real = LM.from_pretrained

    def official_in_bytes(name, *args, **kwargs):  # its real tokenizer would be downloaded
        model = real(folder)
        model.trained_on["tokenizer"] = "bytes"
        return model

    monkeypatch.setattr(LM, "from_pretrained", official_in_bytes)
    argv = ["--task", "passkey", "--init", "fitted_noise", "--init_from", "state-spaces/mamba2-370m"]
    args, _ = train.resolve_args(train.build_parser().parse_args(argv), {"task", "init", "init_from"})
    assert (args.preset, args.max_steps, args.seq_len, args.batch_size * args.grad_accum, args.lr) == \
        ("mamba2-370m", 1000, 2048, 256, 3e-4)
    assert args.tokenizer == "bytes"
    # a byte-level checkpoint of this project fine-tunes on passkey examples in bytes
    assert run_main(passkey_flags(tmp_path / "bytes", "--init_from", str(base_run), "--max_steps", "1")) is None
    ckpt = train.load_checkpoint(tmp_path / "bytes")
    assert ckpt["corpus"]["tokenizer"] == "bytes" and ckpt["model_config"]["vocab_size"] == 257


def test_passkey_errors_are_one_line(tiny_corpus, bpe_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for extra, message in (([], "--task passkey fine-tunes a language model on examples in its own tokenizer: give "
                                "--init_from"),
                           (["--init", "fitted_noise"], "give --init_from"),
                           (["--from_scratch", "--init", "tbptt"], "give --init_from"),
                           (["--init_from", str(bpe_model[0]), "--seq_len", "64"],
                            "--task passkey makes its own examples; drop --data and --seq_len")):
        error = run_main(passkey_flags(tmp_path / "bad", *extra))
        assert message in error and "\n" not in error, error
    assert not (tmp_path / "out").exists() and not (tmp_path / "bad").exists()  # nothing pre-trained or written
    assert run_main(task_flags(tmp_path / "copy", "--max_steps", "1")) is None  # a copy model reads no words
    error = run_main(passkey_flags(tmp_path / "bad", "--init_from", str(tmp_path / "copy")))
    assert "does not say which tokenizer it was trained with" in error and "\n" not in error
    # a tokenizer.json replaced after the model was trained is refused, not silently used
    tokenizer = bpe_model[1]
    original = tokenizer.read_bytes()
    try:
        tokenizer.write_bytes(original + b"\n")  # the same tokens, but not provably: another sha256
        error = run_main(passkey_flags(tmp_path / "bad", "--init_from", str(bpe_model[0])))
    finally:
        tokenizer.write_bytes(original)
    assert "put back the tokenizer the model was trained with" in error and "\n" not in error


def test_recompute_lowers_the_memory_estimate_and_the_large_presets_use_it():
    from model import LM, ModelConfig, autocast_for

    model = LM(ModelConfig(vocab_size=257, d_model=64, n_layer=4, mixer="mamba2", d_state=16, headdim=16))
    args = train.build_parser().parse_args(["--seq_len", "256", "--batch_size", "8"])
    autocast, _ = autocast_for(torch.device("cpu"))
    kept = train.estimate_memory(model, args, torch.device("cpu"), autocast)
    model.cfg.recompute = True
    recomputed = train.estimate_memory(model, args, torch.device("cpu"), autocast)
    weights = 16 * model.num_parameters()
    assert weights < recomputed < weights + 0.75 * (kept - weights) and model.cfg.recompute
    assert all(train.PRESETS[p]["model"]["recompute"] for p in ("paper", "mamba2-130m", "mamba2-1.3b"))
    assert train.build_parser().parse_args(["--no-recompute"]).recompute is False
