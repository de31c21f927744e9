"""Tests of train.py: every intervention trains, runs resume exactly, two processes train together, errors are
one clear line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from conftest import tiny_run_flags
from interventions import INITS

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


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_corpus, tmp_path, monkeypatch):
    real_step = train.Run.train_step
    calls = []

    def step_that_breaks(self):
        loss, lr = real_step(self)
        calls.append(1)
        return (float("nan"), lr) if len(calls) == 3 else (loss, lr)

    monkeypatch.setattr(train.Run, "train_step", step_that_breaks)
    error = run_main(tiny_run_flags(tiny_corpus, tmp_path / "nan"))
    assert "loss became nan at step 3" in error and "last good checkpoint" in error
    assert train.load_checkpoint(tmp_path / "nan")["step"] == 2


def test_checkpoints_are_written_atomically(tmp_path):
    train.save_checkpoint(tmp_path / "run", {"format": train.CHECKPOINT_FORMAT, "x": torch.ones(3)})
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
    train.save_checkpoint(tmp_path / "moved", moved)
    assert "resume it on a cuda device" in run_main(["--resume", "--out_dir", str(tmp_path / "moved")])
    doubled = {**ckpt, "ranks": ckpt["ranks"] * 2}
    train.save_checkpoint(tmp_path / "doubled", doubled)
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
