"""Tests of train.py: every intervention trains, runs resume exactly, two processes train together, options resolve
in the documented order, nothing is lost or half-written, and every mistake is one line that names the flag or
file (the tests check what an error names and how the script exits, never a message's wording)."""
import argparse
import ast
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as evaluation
import pretrained
import runs
import tasks
import train
from conftest import tiny_run_flags
from interventions import INITS
from model import LM, ModelConfig
from runs import CHECKPOINT_FORMAT, save_checkpoint

REPO = Path(train.__file__).resolve().parent
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
    """train.main in this process; returns the one-line error of a failed run (checked to be one line, exit 1), or
    None."""
    try:
        train.main(argv)
    except SystemExit as exit_info:
        message = str(exit_info.code)
        assert message.startswith("train.py:") and "\n" not in message and "Traceback" not in message, message
        return message
    return None


def read_log(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def load(out_dir):
    return runs.load_checkpoint(out_dir)


def resolve(given):
    """train.py's options for flags given, as train_one resolves them."""
    return runs.resolve(given, train.DEFAULTS, train.load_model, train.reads_text)


@pytest.fixture(scope="module")
def base_run(tiny_corpus, tmp_path_factory):
    """A 4-step pre-trained (zero init) checkpoint folder."""
    out = tmp_path_factory.mktemp("runs") / "zero"
    assert run_main(tiny_run_flags(tiny_corpus, out)) is None
    return out


# ----------------------------------------------------------------------------------------------------------------
# Training and post-training
# ----------------------------------------------------------------------------------------------------------------

def test_pretraining_writes_checkpoint_and_log(base_run):
    ckpt = load(base_run)
    assert ckpt["step"] == 4 and ckpt["args"]["init"] == "zero" and ckpt["args"]["seq_len"] == 16
    log = read_log(base_run)
    assert [r["step"] for r in log if "train_loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in log if "val_loss" in r] == [2, 4]
    assert all(r["val_loss"] > 0 and r["val_loss_beyond_T"] > 0 for r in log if "val_loss" in r)
    assert sorted(p.name for p in base_run.iterdir()) == ["ckpt.pt", "log.jsonl"]  # the lock is gone


@pytest.mark.parametrize("init", [i for i in INITS if i != "zero"] + ["zero"])
@pytest.mark.core
def test_post_training_with_every_intervention(tiny_corpus, base_run, tmp_path, init):
    out = tmp_path / init
    mix = [] if init == "zero" else ["--p_zero", "0.25"]
    flags = post_flags(tiny_run_flags(tiny_corpus, out, "--init", init, "--init_from", str(base_run),
                                      "--max_steps", "2", *mix))
    assert run_main(flags) is None
    ckpt = load(out)
    assert ckpt["step"] == 2 and ckpt["args"]["init"] == init and ckpt["args"]["init_from"] == str(base_run)
    assert ckpt["model_config"] == load(base_run)["model_config"]
    base_weights = load(base_run)["model"]
    assert any(not torch.equal(v, base_weights[k]) for k, v in ckpt["model"].items())  # it trained


def test_intervention_during_pretraining(tiny_corpus, tmp_path):
    out = tmp_path / "sp"
    assert run_main(tiny_run_flags(tiny_corpus, out, "--init", "state_passing", "--from_scratch")) is None
    assert load(out)["args"]["init_from"] is None


def test_one_command_recipe_pretrains_the_base_first(tiny_corpus, tmp_path, capsys):
    flags = tiny_run_flags(tiny_corpus, "unused")
    i = flags.index("--out_dir")
    del flags[i:i + 2]
    assert run_main(flags + ["--init", "fitted_noise", "--base_steps", "3"]) is None
    done = [line for line in capsys.readouterr().out.splitlines() if "done" in line]
    assert len(done) == 2 and "eval.py" not in done[0] and "eval.py" in done[1]  # one next command, at the end
    assert load(tmp_path / "out" / "zero")["args"]["init"] == "zero" and load(tmp_path / "out" / "zero")["step"] == 3
    assert load(tmp_path / "out" / "fitted_noise")["args"]["init_from"] == os.path.join("out", "zero")


def test_a_bad_post_training_flag_stops_before_the_automatic_pre_training(tiny_corpus, tmp_path):
    flags = tiny_run_flags(tiny_corpus, "unused")
    i = flags.index("--out_dir")
    del flags[i:i + 2]
    assert "--noise_std" in run_main(flags + ["--init", "state_passing", "--noise_std", "0.2"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("init", ["zero", "state_passing", "tbptt", "fitted_noise"])
@pytest.mark.core
def test_resume_is_exact(tiny_corpus, base_run, tmp_path, init):
    """4 steps in one go == 2 steps, stop, resume for 2 more: identical weights and optimizer state."""
    extra = ["--init", init] + ([] if init == "zero" else ["--init_from", str(base_run), "--max_steps", "4",
                                                            "--p_zero", "0.3"])
    flags = lambda out: (tiny_run_flags(tiny_corpus, out, *extra) if init == "zero"  # noqa: E731
                         else post_flags(tiny_run_flags(tiny_corpus, out, *extra)))
    assert run_main(flags(tmp_path / "whole")) is None
    assert run_main(flags(tmp_path / "split") + ["--stop_at", "2"]) is None
    assert load(tmp_path / "split")["step"] == 2
    assert run_main(["--resume", "--out_dir", str(tmp_path / "split")]) is None
    whole, split = load(tmp_path / "whole"), load(tmp_path / "split")
    assert split["step"] == 4
    for key, value in whole["model"].items():
        assert torch.equal(value, split["model"][key]), key
    for a, b in zip(whole["optimizer"]["state"].values(), split["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])


def test_two_process_gloo_run(tiny_corpus, tmp_path):
    out = tmp_path / "ddp"
    flags = tiny_run_flags(tiny_corpus, out, "--init", "state_passing", "--from_scratch", "--max_steps", "2")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(REPO / "train.py"), *flags], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = load(out)
    assert ckpt["step"] == 2 and len(ckpt["ranks"]) == 2
    # every rank keeps its own passed states: different data, so different states
    passed = [r["intervention"]["previous"]["ssm"][0] for r in ckpt["ranks"]]
    assert not torch.equal(passed[0], passed[1])


def test_one_command_recipe_under_torchrun(tiny_corpus, tmp_path):
    """The automatic pre-training and the post-training share one process group (this used to deadlock)."""
    flags = tiny_run_flags(tiny_corpus, "unused", "--max_steps", "2")
    i = flags.index("--out_dir")
    del flags[i:i + 2]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(REPO / "train.py"), *flags, "--init", "state_passing", "--base_steps", "4"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert load(tmp_path / "out" / "zero")["step"] == 4
    post = load(tmp_path / "out" / "state_passing")
    assert post["step"] == 2 and len(post["ranks"]) == 2


def test_post_training_keeps_the_base_training_length(tiny_corpus, base_run, tmp_path):
    flags = post_flags(tiny_run_flags(tiny_corpus, tmp_path / "p", "--init", "tbptt", "--init_from", str(base_run),
                                      "--max_steps", "1"))
    i = flags.index("--seq_len")
    del flags[i:i + 2]  # the preset says 64; the base was trained at 16
    assert run_main(flags) is None
    assert load(tmp_path / "p")["args"]["seq_len"] == 16


def test_save_every_keeps_copies_along_training(tiny_corpus, tmp_path):
    out = tmp_path / "along"
    assert run_main(tiny_run_flags(tiny_corpus, out, "--save_every", "1", "--eval_interval", "4")) is None
    copies = sorted(p.name for p in out.glob("ckpt_*.pt"))
    assert copies == ["ckpt_1.pt", "ckpt_2.pt", "ckpt_3.pt", "ckpt_4.pt"]
    step_2 = runs.load_model(out / "ckpt_2.pt")  # a model eval.py can read, with its step and options
    assert runs.load_checkpoint(out / "ckpt_2.pt")["step"] == 2 and step_2.trained_on["seq_len"] == 16
    assert "optimizer" not in runs.load_checkpoint(out / "ckpt_2.pt")
    assert all(torch.equal(a, b) for a, b in zip(runs.load_model(out / "ckpt_4.pt").state_dict().values(),
                                                 runs.load_model(out).state_dict().values()))


# ----------------------------------------------------------------------------------------------------------------
# Options: one place each, resolved in a documented order
# ----------------------------------------------------------------------------------------------------------------

def test_every_option_is_a_flag_with_help(capsys):
    with pytest.raises(SystemExit):
        train.parse(["--help"])
    text = capsys.readouterr().out
    for name in train.DEFAULTS:  # TrainConfig's, ModelConfig's and every intervention's options
        assert f"--{name}" in text
    for cls in (train.TrainConfig, ModelConfig):
        assert all(f.metadata["help"] for f in dataclasses.fields(cls) if "help" in f.metadata)
    assert all(help for cls in INITS.values() for _, help in cls.options.values())
    assert train.parse([]) == {}  # nothing given: every value comes from resolve's layers


def test_options_resolve_in_the_documented_order(tiny_corpus, base_run):
    """defaults < preset < preset's post-training values < task defaults < the base's < the command line."""
    data = ["--data", tiny_corpus[1], "--data_dir", tiny_corpus[0]]
    args, base = resolve(train.parse(data))
    assert base is None and (args.lr, args.max_steps, args.d_state, args.seq_len) == (3e-3, 3000, 64, 64)  # demo
    args, base = resolve(train.parse(data + ["--init", "tbptt", "--init_from", str(base_run)]))
    assert (args.lr, args.max_steps, args.warmup_steps) == (1e-3, 500, 20)  # the preset's post-training values
    assert (args.seq_len, args.batch_size, args.d_state, args.chunk_size) == (16, 4, 16, 16)  # the base's
    assert base.cfg.d_model == 32
    args, _ = resolve(train.parse(data + ["--init", "tbptt", "--init_from", str(base_run), "--lr", "0.01",
                                                "--seq_len", "24", "--chunk_size", "8"]))
    assert (args.lr, args.seq_len, args.chunk_size) == (0.01, 24, 8)  # the command line last
    args, _ = resolve(train.parse(["--task", "copy"]))
    assert (args.preset, args.task, args.n_layer, args.context, args.out_dir) == (
        "copy", "copy", runs.PRESETS["copy"]["n_layer"], 0, os.path.join("out", "copy", "zero"))


def test_a_preset_value_yields_to_the_limit_it_passes_but_a_given_one_is_refused(tiny_corpus):
    data = ["--data", tiny_corpus[1], "--data_dir", tiny_corpus[0]]
    args, _ = resolve(train.parse(data + ["--max_steps", "4", "--lr", "1e-4"]))
    assert (args.warmup_steps, args.min_lr) == (4, 1e-4)  # the demo's 100 and 3e-4 would pass them
    assert "--warmup_steps" in run_main(data + ["--max_steps", "4", "--warmup_steps", "5"])
    assert "--min_lr" in run_main(data + ["--lr", "1e-4", "--min_lr", "1e-3"])


@pytest.mark.parametrize("extra,flag", [
    (["--init", "warm_start"], "--init"),
    (["--mixer", "transformer"], "--mixer"),
    (["--init", "state_passing", "--from_scratch", "--noise_std", "0.2"], "--noise_std"),
    (["--ssm_only"], "--ssm_only"),
    (["--init", "tbptt", "--from_scratch", "--p_zero", "1.5"], "--p_zero"),
    (["--init", "tbptt", "--from_scratch", "--p_zero", "1"], "--p_zero"),
    (["--p_zero", "0.1"], "--p_zero"),  # --init zero: every row starts from zero anyway
    (["--init", "tbptt", "--init_from", "x", "--from_scratch"], "--from_scratch"),
    (["--seq_len", "0"], "--seq_len"),
    (["--chunk_size", "0"], "--chunk_size"),
    (["--log_interval", "0"], "--log_interval"),
    (["--device", "tpu9"], "--device"),
    (["--device", "mps"], "--device"),
    (["--d_state", "256", "--backend", "triton"], "--backend"),
    (["--lr", "nan"], "--lr"), (["--lr", "-1"], "--lr"), (["--lr", "inf"], "--lr"), (["--lr", "1e300"], "--lr"),
    (["--weight_decay", "-1"], "--weight_decay"),
    (["--init", "random_noise", "--from_scratch", "--noise_std", "-1"], "--noise_std"),
    (["--d_state", "0"], "--d_state"), (["--headdim", "0"], "--headdim"), (["--expand", "0"], "--expand"),
    (["--dt_min", "-1"], "--dt_min"), (["--dt_min", "0.5", "--dt_max", "0.1"], "dt_min"),
    (["--stop_at", "0"], "--stop_at"), (["--stop_at", "-1"], "--stop_at"),
    (["--stop_at", "5"], "--stop_at"),  # beyond --max_steps 4: the run ends first
    (["--out_dir", ""], "--out_dir"), (["--data", " "], "--data"),  # empty: not the default in disguise
    (["--from_scratch"], "--from_scratch"), (["--base_steps", "3"], "--base_steps"),  # --init zero: nothing to skip
    (["--init", "tbptt", "--from_scratch", "--base_steps", "3"], "--base_steps"),  # no pre-training to size
    (["--seed", "1e20"], "--seed"), (["--seed", "100000000000000000000"], "--seed"),
    (["--n_heads", "2"], "--n_heads"),  # a gla flag with the mamba2 mixer
    (["--mixer", "gla", "--gate", "none"], "--d_state"),  # tiny_run_flags' mamba2 flags with gla
    (["--alphabet_size", "5"], "--alphabet_size"),  # a copy flag with --task lm
    (["--task", "copy"], "--data"),  # the task makes its own examples
    (["--eval_seqs", "100000"], "--eval_seqs"),  # more validation text than the corpus has
])
def test_bad_flags_exit_with_one_line_naming_them(tiny_corpus, tmp_path, extra, flag):
    error = run_main(tiny_run_flags(tiny_corpus, tmp_path / "x", *extra))
    assert error is not None and flag in error
    assert not (tmp_path / "x").exists() and not (tmp_path / "out").exists()  # nothing was created


@pytest.mark.parametrize("extra,flag", [
    (["--context", "-1"], "--context"), (["--alphabet_size", "1"], "alphabet_size"),
    (["--n_train", "40", "--context", "50"], "context"), (["--seq_len", "32"], "--seq_len"),
    (["--noise_std", "0.1"], "--noise_std"),
])
def test_bad_task_flags_exit_with_one_line_naming_them(tmp_path, extra, flag):
    assert flag in run_main(task_flags(tmp_path / "x", *extra))
    assert not (tmp_path / "x").exists()


def test_model_flags_of_the_mixer_in_use_are_taken(tiny_corpus, tmp_path):
    data_dir, name = tiny_corpus
    assert run_main(["--data", name, "--data_dir", data_dir, "--out_dir", str(tmp_path / "gla"), "--mixer", "gla",
                     "--n_heads", "2", "--d_model", "32", "--n_layer", "1", "--seq_len", "16", "--batch_size", "4",
                     "--eval_seqs", "2", "--max_steps", "1", "--device", "cpu"]) is None
    assert load(tmp_path / "gla")["model_config"]["n_heads"] == 2


def test_missing_data_names_the_corpus(tmp_path):
    error = run_main(["--data", "no_such_corpus", "--data_dir", str(tmp_path), "--out_dir", str(tmp_path / "x")])
    assert "no_such_corpus" in error and "python -m corpora" in error


def test_checkpoint_errors_name_the_file(tiny_corpus, base_run, tmp_path):
    assert str(tmp_path / "nothing_here") in run_main(["--resume", "--out_dir", str(tmp_path / "nothing_here")])
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "ckpt.pt").write_bytes(b"not a checkpoint at all")
    assert str(tmp_path / "corrupt") in run_main(["--resume", "--out_dir", str(tmp_path / "corrupt")])
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    error = run_main(post_flags(tiny_run_flags(tiny_corpus, tmp_path / "y", "--init", "tbptt",
                                               "--init_from", str(tmp_path / "foreign.pt"))))
    assert "foreign.pt" in error
    error = run_main(tiny_run_flags(tiny_corpus, tmp_path / "z", "--init", "tbptt", "--init_from", str(base_run),
                                    "--d_model", "64"))
    assert "--d_model" in error
    save_checkpoint(tmp_path / "bare", {"format": CHECKPOINT_FORMAT, "model": {}})
    assert "bare" in run_main(["--resume", "--out_dir", str(tmp_path / "bare")])
    assert "bare" in run_main(post_flags(tiny_run_flags(tiny_corpus, tmp_path / "p", "--init", "tbptt",
                                                        "--init_from", str(tmp_path / "bare"))))


def test_resume_refuses_changed_training_flags_and_takes_those_marked_resume(tiny_corpus, tmp_path):
    out = tmp_path / "r"
    assert run_main(tiny_run_flags(tiny_corpus, out, "--stop_at", "2")) is None
    assert "--lr" in run_main(["--resume", "--out_dir", str(out), "--lr", "0.5"])
    for flag, step in (("--stop_at", "2"), ("--max_steps", "1"), ("--stop_at", "5")):  # reached, or past the end
        assert flag in run_main(["--resume", "--out_dir", str(out), flag, step])
    assert load(out)["step"] == 2
    assert run_main(["--resume", "--out_dir", str(out), "--chunk_size", "8", "--backend", "torch"]) is None
    ckpt = load(out)
    assert ckpt["step"] == 4 and ckpt["model_config"]["chunk_size"] == 8


def test_resume_can_extend_a_finished_run(tiny_corpus, tmp_path):
    out = tmp_path / "extend"
    assert run_main(tiny_run_flags(tiny_corpus, out)) is None
    assert run_main(["--resume", "--out_dir", str(out), "--max_steps", "6"]) is None
    assert load(out)["step"] == 6
    assert [r["step"] for r in read_log(out) if "train_loss" in r] == [1, 2, 3, 4, 5, 6]  # each step logged once


def test_resume_drops_log_lines_of_lost_steps_and_torn_lines(tiny_corpus, tmp_path):
    for out, tail in ((tmp_path / "lost", json.dumps({"step": 3, "train_loss": 9.9}) + "\n"),
                      (tmp_path / "torn", '{"step": 3, "train_lo')):
        assert run_main(tiny_run_flags(tiny_corpus, out, "--stop_at", "2")) is None
        with open(out / "log.jsonl", "a") as f:  # as if step 3 had been logged, then the process died
            f.write(tail)
        assert run_main(["--resume", "--out_dir", str(out)]) is None
        log = [r for r in read_log(out) if "train_loss" in r]
        assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["train_loss"] != 9.9 for r in log)


def test_resume_refuses_another_device_type_or_process_count(base_run, tmp_path):
    ckpt = load(base_run)
    moved = {**ckpt, "ranks": [{**ckpt["ranks"][0], "intervention": {**ckpt["ranks"][0]["intervention"],
                                                                        "generator_device": "cuda:0"}}]}
    save_checkpoint(tmp_path / "moved", moved)
    assert "cuda" in run_main(["--resume", "--out_dir", str(tmp_path / "moved")])
    save_checkpoint(tmp_path / "doubled", {**ckpt, "ranks": ckpt["ranks"] * 2})
    assert "--nproc_per_node=2" in run_main(["--resume", "--out_dir", str(tmp_path / "doubled")])


def test_resume_refuses_a_corpus_prepared_again(tmp_path):
    from corpora.prepare import prepare

    (tmp_path / "t.txt").write_text("def f(x):\n    return x\n" * 2000)
    prepare(tmp_path / "t.txt", name="mine", data_dir=tmp_path / "data")
    assert run_main(tiny_run_flags((str(tmp_path / "data"), "mine"), tmp_path / "run", "--stop_at", "2")) is None
    prepare(tmp_path / "t.txt", name="mine", data_dir=tmp_path / "data")  # the same text, prepared again
    error = run_main(["--resume", "--out_dir", str(tmp_path / "run")])
    assert "mine" in error and "--init_from" in error


def test_post_training_needs_the_same_vocabulary(base_run, tmp_path):
    from corpora.prepare import prepare

    (tmp_path / "t.txt").write_text("some text " * 3000)
    prepare(tmp_path / "t.txt", name="other", data_dir=tmp_path, tokenizer="bytes")
    meta_path = tmp_path / "other" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["vocab_size"] = 300  # as if another tokenizer had made it
    meta_path.write_text(json.dumps(meta))
    error = run_main(["--init", "tbptt", "--init_from", str(base_run), "--data", "other", "--data_dir",
                      str(tmp_path), "--out_dir", str(tmp_path / "o"), "--device", "cpu"])
    assert "257" in error and "300" in error


def test_unfinished_base_run_is_not_post_trained(tiny_corpus, tmp_path):
    assert run_main(tiny_run_flags(tiny_corpus, tmp_path / "out" / "zero", "--stop_at", "2")) is None
    error = run_main(["--init", "state_passing", "--data", tiny_corpus[1], "--data_dir", tiny_corpus[0]])
    assert "--resume" in error and os.path.join("out", "zero") in error


def test_offline_default_corpus_says_what_to_set(tmp_path, monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    error = run_main(["--preset", "paper", "--data_dir", str(tmp_path), "--out_dir", str(tmp_path / "o"),
                      "--device", "cpu"])
    assert "TIKTOKEN_CACHE_DIR" in error and "--data stdlib" in error


def test_start_and_end_lines_say_what_happens(tiny_corpus, tmp_path, capsys):
    assert run_main(tiny_run_flags(tiny_corpus, tmp_path / "r", "--grad_accum", "2")) is None
    out, err = capsys.readouterr()
    assert "8 sequences of 16 tokens per step" in err
    assert out.strip().splitlines()[-1].endswith(f"python eval.py --ckpt {tmp_path / 'r'} --out {tmp_path / 'eval'}")


@pytest.mark.parametrize("out_dir,hint", [("out/zero", ""), ("out/la/state_passing", " --out eval/la"),
                                          ("out/copy/gla/zero", " --out eval/copy/gla"), ("runs/x", " --out runs/eval")])
def test_the_next_command_keeps_figures_apart_from_the_quick_starts(out_dir, hint):
    assert runs.eval_out(out_dir) == hint


def test_a_step_far_beyond_the_machine_is_announced(capsys):
    model = LM(ModelConfig(vocab_size=257, d_model=64, n_layer=1, mixer="mamba2", d_state=16, headdim=16))
    args = argparse.Namespace(batch_size=10 ** 6, grad_accum=64, seq_len=2048, max_steps=500)
    runs.warn_if_slow(model, args, torch.device("cpu"))
    assert "python train.py" in capsys.readouterr().err  # suggests the demo
    runs.warn_if_slow(model, argparse.Namespace(batch_size=1, grad_accum=1, seq_len=16, max_steps=1),
                      torch.device("cpu"))
    assert capsys.readouterr().err == ""


def test_the_speed_probe_survives_a_machine_too_busy_to_finish_one_product(monkeypatch, capsys):
    # a clock that jumps 1 s per reading: the 50 ms timing loop is over before its first product on a loaded machine
    clock = iter(range(0, 10 ** 6))
    monkeypatch.setattr(runs.time, "perf_counter", lambda: float(next(clock)))
    model = LM(ModelConfig(vocab_size=257, d_model=64, n_layer=1, mixer="mamba2", d_state=16, headdim=16))
    runs.warn_if_slow(model, argparse.Namespace(batch_size=1, grad_accum=1, seq_len=16, max_steps=1),
                      torch.device("cpu"))
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------------------------------------------
# Nothing lost: output folders, interrupted runs, numbers that are not finite
# ----------------------------------------------------------------------------------------------------------------

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
    assert "step 3" in error and "step 2" in error  # where it failed, and which checkpoint survives
    assert load(tmp_path / "nan")["step"] == 2


def test_weights_that_are_not_finite_are_never_saved(tiny_corpus, tmp_path, monkeypatch):
    def break_weights(run, loss, lr):
        with torch.no_grad():
            run.model.backbone.norm_f.weight[0] = float("inf")
        return loss, lr  # the loss was computed before the update: finite

    patch_step(monkeypatch, 4, break_weights)
    error = run_main(tiny_run_flags(tiny_corpus, tmp_path / "inf"))
    assert "backbone.norm_f.weight" in error and "step 2" in error
    assert load(tmp_path / "inf")["step"] == 2
    # weights broken before the first checkpoint: nothing good to save, and it says so
    patch_step(monkeypatch, 1, break_weights)
    assert "step 1" in run_main(tiny_run_flags(tiny_corpus, tmp_path / "first", "--max_steps", "1"))
    assert not (tmp_path / "first" / "ckpt.pt").exists()


def test_optimizer_and_intervention_states_that_are_not_finite_are_neither_saved_nor_resumed(tiny_corpus, tmp_path,
                                                                                            monkeypatch):
    def break_moment(run, loss, lr):
        state = next(iter(run.optimizer.state.values()))
        state["exp_avg_sq"].view(-1)[0] = float("nan")  # the weights stay finite: the parameter just stops
        return loss, lr

    with monkeypatch.context() as patch:
        patch_step(patch, 4, break_moment)
        assert "exp_avg_sq" in run_main(tiny_run_flags(tiny_corpus, tmp_path / "moment"))
    assert load(tmp_path / "moment")["step"] == 2
    def break_passed_state(run, loss, lr):
        run.intervention.previous.ssm[0].fill_(float("inf"))  # the state the next batch would start from
        return loss, lr

    with monkeypatch.context() as patch:
        patch_step(patch, 4, break_passed_state)
        assert "previous" in run_main(tiny_run_flags(tiny_corpus, tmp_path / "passed", "--init", "state_passing",
                                                     "--from_scratch"))
    # a checkpoint written with one anyway (by an older version, say) is refused on resume
    ckpt = load(tmp_path / "moment")
    ckpt["optimizer"]["state"][0]["exp_avg"].view(-1)[0] = float("nan")
    torch.save(ckpt, tmp_path / "moment" / "ckpt.pt")
    assert "exp_avg" in run_main(["--resume", "--out_dir", str(tmp_path / "moment")])


@pytest.mark.parametrize("how,saved_step", [("signal", 3), ("exception", 2)])
def test_ctrl_c_stops_at_a_step_boundary_and_resumes_exactly(tiny_corpus, tmp_path, monkeypatch, capsys, how,
                                                              saved_step):
    """A Ctrl-C (SIGINT) during step 3 lets the step finish, saves it and stops; a KeyboardInterrupt raised in the
    middle of step 3 (a second Ctrl-C) loses that step and keeps the checkpoint of step 2. Either way --resume
    reaches the weights of an uninterrupted run. Whatever SIGINT's handling was before (nohup ignores it), it is
    the same after."""
    assert run_main(tiny_run_flags(tiny_corpus, tmp_path / "whole")) is None

    def interrupt(run, loss, lr):
        if how == "exception":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGINT)
        return loss, lr

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under nohup
    try:
        with monkeypatch.context() as patch:
            patch_step(patch, 3, interrupt)
            with pytest.raises(SystemExit) as exit_info:
                train.main(tiny_run_flags(tiny_corpus, tmp_path / "split"))
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    assert exit_info.value.code == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert ("--resume --out_dir" in last) == (how == "signal") and f"step {saved_step}" in last
    assert load(tmp_path / "split")["step"] == saved_step
    assert run_main(["--resume", "--out_dir", str(tmp_path / "split")]) is None
    whole, split = load(tmp_path / "whole"), load(tmp_path / "split")
    for key, value in whole["model"].items():
        assert torch.equal(value, split["model"][key]), key
    assert [r["step"] for r in read_log(tmp_path / "split") if "train_loss" in r] == [1, 2, 3, 4]


def test_checkpoints_are_written_atomically(tmp_path):
    save_checkpoint(tmp_path / "run", {"format": CHECKPOINT_FORMAT, "model": {"x": torch.ones(3)}})
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["ckpt.pt"]  # no temporary file left


def test_a_checkpoint_write_that_fails_inside_torch_save_is_one_line_and_keeps_the_last_checkpoint(tiny_corpus,
                                                                                                   base_run, tmp_path,
                                                                                                   monkeypatch):
    """torch's zip writer reports a full disk as a RuntimeError (PytorchStreamWriter failed writing file): told in
    one line like any failed write, the checkpoint it would have replaced intact and no temporary file left."""
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    before = (out / "ckpt.pt").read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")

    monkeypatch.setattr(torch, "save", disk_full)
    assert str(out / "ckpt.pt") in run_main(["--resume", "--out_dir", str(out), "--max_steps", "5"])
    assert (out / "ckpt.pt").read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["ckpt.pt",
                                                                                                  "log.jsonl"]
    with pytest.raises(OSError):
        save_checkpoint(out, {"format": CHECKPOINT_FORMAT, "model": {"x": torch.ones(3)}})

    def broken(obj, f, *args, **kwargs):  # any other error of torch.save is a bug to see, not a full disk
        raise RuntimeError("something else")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="something else"):
        save_checkpoint(out, {"format": CHECKPOINT_FORMAT, "model": {"x": torch.ones(3)}})
    assert (out / "ckpt.pt").read_bytes() == before


def test_existing_runs_and_folders_are_never_overwritten_silently(tiny_corpus, base_run, tmp_path):
    before = (base_run / "ckpt.pt").read_bytes()
    assert "--overwrite" in run_main(tiny_run_flags(tiny_corpus, base_run))
    assert "--out_dir" in run_main(post_flags(tiny_run_flags(tiny_corpus, base_run, "--init", "zero", "--init_from",
                                                             str(base_run), "--overwrite")))
    assert (base_run / "ckpt.pt").read_bytes() == before
    out = tmp_path / "again"
    assert run_main(tiny_run_flags(tiny_corpus, out)) is None
    assert run_main(tiny_run_flags(tiny_corpus, out, "--overwrite", "--max_steps", "2")) is None
    assert [r["step"] for r in read_log(out) if "train_loss" in r] == [1, 2]  # a new log, not an appended one
    # a folder holding someone's files (a log, notes) is refused without --overwrite, and they are kept with it
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "log.jsonl").write_text("their log\n")
    (tmp_path / "theirs" / "notes.txt").write_text("keep me")
    assert "--overwrite" in run_main(tiny_run_flags(tiny_corpus, tmp_path / "theirs"))
    assert (tmp_path / "theirs" / "log.jsonl").read_text() == "their log\n"
    assert run_main(tiny_run_flags(tiny_corpus, tmp_path / "theirs", "--overwrite")) is None
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "keep me" and load(tmp_path / "theirs")["step"] == 4


def test_a_new_run_that_fails_before_its_first_checkpoint_leaves_the_old_run_whole(tiny_corpus, base_run, tmp_path,
                                                                                 monkeypatch):
    out = tmp_path / "old"
    assert run_main(tiny_run_flags(tiny_corpus, out)) is None
    checkpoint, log = (out / "ckpt.pt").read_bytes(), (out / "log.jsonl").read_text()
    patch_step(monkeypatch, 1, lambda run, loss, lr: (float("nan"), lr))
    assert run_main(tiny_run_flags(tiny_corpus, out, "--overwrite")) is not None
    assert (out / "ckpt.pt").read_bytes() == checkpoint and (out / "log.jsonl").read_text() == log


def test_a_folder_in_use_by_another_run_is_refused_and_a_dead_runs_lock_is_taken_over(tiny_corpus, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(str(other.pid))
        error = run_main(tiny_run_flags(tiny_corpus, out))
        assert str(other.pid) in error and not (out / "ckpt.pt").exists()
    finally:
        other.kill()
        other.wait()
    assert run_main(tiny_run_flags(tiny_corpus, out)) is None  # its process is gone: the lock is stale
    assert load(out)["step"] == 4 and not (out / ".lock").exists()


def test_files_in_the_way_are_one_line_errors(tiny_corpus, tmp_path):
    (tmp_path / "a_file").write_text("x")
    assert "a_file" in run_main(tiny_run_flags(tiny_corpus, tmp_path / "a_file"))
    for data in ("stdlib", tiny_corpus[1]):  # the default corpus (prepared on first use) and a named one
        error = run_main(["--data", data, "--data_dir", str(tmp_path / "a_file"), "--out_dir", str(tmp_path / "o")])
        assert "a_file" in error


# ----------------------------------------------------------------------------------------------------------------
# Damaged or crafted checkpoints: refused by train.py --resume and eval.py in one line, before their values are read
# ----------------------------------------------------------------------------------------------------------------

class Posing:
    """Pickles as a tensor of the given size and stride over the storage of base, as a crafted file can (torch.save
    writes only what a real tensor is)."""

    def __init__(self, base, size, stride):
        self.base, self.size, self.stride = base, size, stride

    def __reduce_ex__(self, protocol):
        storage = torch.storage.TypedStorage(wrap_storage=self.base.untyped_storage(), dtype=self.base.dtype,
                                             _internal=True)
        return torch._utils._rebuild_tensor_v2, (storage, 0, self.size, self.stride, False, {})


def damaged(run_dir, out, change):
    """A copy of the checkpoint in run_dir, as out/ckpt.pt, with change(ckpt) applied."""
    ckpt = torch.load(run_dir / "ckpt.pt", weights_only=True)
    change(ckpt)
    out.mkdir()
    torch.save(ckpt, out / "ckpt.pt")
    return out


REMOVED = object()


def at(path, value):
    """change(ckpt) for damaged: the entry at path (a sequence of keys) replaced by value, by value(entry) when it is
    a function, or removed when it is REMOVED."""
    def change(ckpt):
        *keys, last = path
        for key in keys:
            ckpt = ckpt[key]
        if value is REMOVED:
            del ckpt[last]
        else:
            ckpt[last] = value(ckpt[last]) if callable(value) else value
    return change


def eval_error(ckpt, tiny_corpus):
    """eval.py's one-line error on a checkpoint (checked to be one line, exit 1)."""
    with pytest.raises(SystemExit) as exit_info:
        evaluation.main(["--ckpt", str(ckpt), "--data_dir", tiny_corpus[0], "--len", "64", "--num_seqs", "1"])
    message = str(exit_info.value.code)
    assert message.startswith("eval.py: error:") and "\n" not in message, message
    return message


def test_tensors_standing_for_more_than_the_file_holds_or_for_another_shape_are_refused(tiny_corpus, base_run,
                                                                                       tmp_path):
    """A few bytes posing as a large tensor (stride 0, a view past its storage) would allocate the size it claims
    once its values are read (the finiteness check, AdamW), and a weight whose strides overlap would become a
    parameter whose updates overwrite each other: refused on loading, naming the tensor. A moment of another shape
    than its parameter is refused by --resume."""
    moment = next(iter(load(base_run)["optimizer"]["state"]))
    shape = load(base_run)["model"]["backbone.embedding.weight"].shape

    def set_moment(value):
        return lambda ckpt: ckpt["optimizer"]["state"][moment].__setitem__("exp_avg", value)

    def set_weight(value):
        return lambda ckpt: ckpt["model"].__setitem__("backbone.embedding.weight", value)

    both = {"huge_moment": (set_moment(torch.zeros(1).expand(8000, 8000)), "exp_avg"),  # 256 MB from 4 bytes
            "expanded_moment": (set_moment(torch.zeros(1).expand(shape)), "exp_avg"),
            "expanded_weight": (set_weight(torch.zeros(1).expand(shape)), "backbone.embedding.weight"),
            "overlapping_weight": (set_weight(torch.zeros(shape.numel()).as_strided(shape, (1, 1))),
                                   "backbone.embedding.weight"),
            "past_storage": (set_weight(Posing(torch.zeros(4), shape, (shape[1], 1))), "ckpt.pt")}
    for name, (change, named) in both.items():
        out = damaged(base_run, tmp_path / name, change)
        assert named in run_main(["--resume", "--out_dir", str(out)]), name
        assert named in eval_error(out, tiny_corpus), name
    out = damaged(base_run, tmp_path / "small_moment", set_moment(torch.zeros(3, 3)))
    assert "exp_avg" in run_main(["--resume", "--out_dir", str(out)])


def test_bookkeeping_that_train_py_would_not_write_is_refused_naming_the_entry(tiny_corpus, tmp_path):
    """Every entry besides the weights is checked when loaded (its type and range; what eval.py reads too), and on
    --resume against the run it continues (the optimizer's parameters, the intervention's and the data's states)."""
    runs_of = {}
    for init in ("tbptt", "fitted_noise"):  # passed states and stream positions; fitted statistics
        runs_of[init] = tmp_path / init
        assert run_main(tiny_run_flags(tiny_corpus, runs_of[init], "--init", init, "--from_scratch", "--max_steps",
                                       "2")) is None

    rank, moment = ("ranks", 0), ("optimizer", "state", 0)
    on_load = {  # refused by train.py --resume and eval.py alike
        "step": [(("step",), "abc"), (("step",), -5), (("step",), 10 ** 15), (("step",), 3)],  # max_steps 2
        "ranks": [(("ranks",), "x"), (("ranks",), [])],
        "optimizer.param_groups": [(("optimizer", "param_groups"), REMOVED)],
        "args.seq_len": [(("args", "seq_len"), "abc"), (("args", "seq_len"), 16.5)],
        "args.init": [(("args", "init"), "nope")],
        "corpus.tokenizer": [(("corpus", "tokenizer"), 5)],
        "model_config.d_model": [(("model_config", "d_model"), 32.5)],
        "ranks[0].torch_rng": [((*rank, "torch_rng"), lambda t: t[:100].clone())],
        "ranks[0].streams.positions": [((*rank, "streams", "positions"), [-1, 0, 0, 0])],
    }
    on_resume = {  # refused by train.py --resume, against the run it would continue
        "optimizer.param_groups": [(("optimizer", "param_groups", 0, "params"), lambda p: p[:-1])],
        "optimizer.param_groups[0].betas": [(("optimizer", "param_groups", 0, "betas"), "x")],
        "optimizer.state.0.step": [((*moment, "step"), torch.tensor(0.0))],
        "args.data": [(("args", "data"), 5)],
        "ranks[0].streams": [((*rank, "streams", "positions"), lambda p: p[:-1])],
        "ranks[0].intervention.previous.ssm.0": [((*rank, "intervention", "previous", "ssm", 0),
                                                  lambda s: s[:, :, :, :-1].clone())],
    }
    fitted_on_resume = {"ranks[0].intervention.count": [((*rank, "intervention", "count"), 0)],
                        "ranks[0].intervention.sums": [((*rank, "intervention", "sums"),
                                                        lambda sums: [s[:-1].clone() for s in sums])]}
    cases = [(init, field, path, value, programs) for init, table, programs in (
        ("tbptt", on_load, ("train", "eval")), ("tbptt", on_resume, ("train",)),
        ("fitted_noise", fitted_on_resume, ("train",))) for field, changes in table.items() for path, value in changes]
    for i, (init, field, path, value, programs) in enumerate(cases):
        out = damaged(runs_of[init], tmp_path / f"case{i}", at(path, value))
        if "train" in programs:
            assert field in run_main(["--resume", "--out_dir", str(out)]), (field, value)
        if "eval" in programs:
            assert field in eval_error(out, tiny_corpus), (field, value)
    for init, out in runs_of.items():  # the checkpoints the cases were made from resume
        assert run_main(["--resume", "--out_dir", str(out), "--max_steps", "3"]) is None and load(out)["step"] == 3


# ----------------------------------------------------------------------------------------------------------------
# Memory and time bounded before anything is built
# ----------------------------------------------------------------------------------------------------------------

def test_memory_estimate_grows_with_the_run_and_refuses_what_cannot_fit(tiny_corpus, monkeypatch):
    def estimate(d_model=32, tokens=256, mixer="mamba2", n_layer=2, dtype=torch.float32, meta=True):
        cfg = ModelConfig(vocab_size=257, d_model=d_model, n_layer=n_layer, mixer=mixer, d_state=16, headdim=16,
                          chunk_size=16)
        with torch.device("meta" if meta else "cpu"):
            return runs.training_memory(LM(cfg), tokens, dtype)

    base = estimate()
    assert estimate(tokens=512) > base and estimate(d_model=64) > base and estimate(n_layer=8) > estimate(n_layer=4)
    assert estimate(mixer="gla") > 0 and estimate(mixer="mamba1") > 0
    # activations scale with the tokens of a micro-batch; the rest is 16 bytes per parameter
    weights_and_optimizer = 2 * estimate(tokens=1) - estimate(tokens=2)
    assert estimate(tokens=1000) - weights_and_optimizer == pytest.approx(1000 * (estimate(tokens=1) -
                                                                                  weights_and_optimizer), rel=1e-9)
    with torch.device("meta"):
        params = LM(ModelConfig(vocab_size=257, d_model=32, n_layer=2, mixer="mamba2", d_state=16, headdim=16,
                                chunk_size=16)).num_parameters()
    assert weights_and_optimizer == 16 * params
    # measured on the meta device, the activations are those the same model keeps on the CPU, for every mixer
    for mixer in ("mamba2", "gla", "mamba1"):
        assert estimate(mixer=mixer) == estimate(mixer=mixer, meta=False)
    # ... and those autograd really saves when the model reads a sequence: per token, what 128 tokens keep beyond 64
    from torch.multiprocessing.reductions import StorageWeakRef

    cfg = ModelConfig(vocab_size=257, d_model=48, n_layer=3, mixer="mamba2", d_state=16, headdim=16, chunk_size=64)
    real = LM(cfg)
    weights = {StorageWeakRef(p.untyped_storage()).cdata for p in real.parameters()}

    def saved_bytes(length):
        saved = {}

        def keep(t):
            key = StorageWeakRef(t.untyped_storage()).cdata
            if key not in weights:
                saved[key] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            real(torch.zeros(1, length, dtype=torch.long), torch.zeros(1, length, dtype=torch.long))
        return sum(saved.values())

    per_block, outside = runs.activations_per_token(real)
    assert per_block > 0 and outside > 0
    assert per_block * cfg.n_layer + outside == pytest.approx((saved_bytes(128) - saved_bytes(64)) / 64, rel=1e-9)
    monkeypatch.setattr(runs, "available_memory", lambda device: 2 ** 10)  # 1 KiB
    error = run_main(tiny_run_flags(tiny_corpus, "big"))
    assert "--batch_size" in error and not Path("big").exists()


def test_the_activations_are_measured_on_chunks_no_longer_than_a_training_sequence():
    """The scan never runs a chunk longer than the sequence, so neither does the measurement: a --chunk_size far
    beyond --seq_len measures what training at seq_len keeps, and never reads a sequence that long."""
    def per_token(chunk_size):
        cfg = ModelConfig(vocab_size=257, d_model=32, n_layer=2, mixer="mamba2", d_state=16, headdim=16,
                          chunk_size=chunk_size)
        return runs.activations_per_token(LM(cfg), seq_len=16)

    assert per_token(4096) == per_token(16)


def test_recompute_lowers_the_memory_estimate_and_the_large_presets_use_it():
    cfg = ModelConfig(vocab_size=257, d_model=64, n_layer=4, mixer="mamba2", d_state=16, headdim=16)
    kept = runs.training_memory(LM(cfg), 8 * 256)
    cfg.recompute = True
    recomputed = runs.training_memory(LM(cfg), 8 * 256)
    weights = 16 * LM(cfg).num_parameters()
    assert weights < recomputed < weights + 0.75 * (kept - weights)
    assert all(runs.PRESETS[p]["recompute"] for p in ("paper", "mamba2-130m", "mamba2-1.3b"))


HUGE = [["--d_model", "1000000"], ["--n_layer", "100000"], ["--expand", "100000"], ["--d_state", "10000000"],
        ["--task", "copy", "--alphabet_size", "100000000"], ["--task", "copy", "--batch_size", "100000000"],
        ["--task", "copy", "--eval_seqs", "100000000"], ["--task", "copy", "--context", "100000000"]]


def test_hostile_sizes_are_refused_before_anything_is_allocated(tiny_corpus, tmp_path):
    """Under a 3 GiB address-space limit, sizes that would need far more are refused in one line within seconds
    (the estimate is made on the meta device), never an allocator traceback or an out-of-memory kill. One process
    tries them all, one after the other."""
    cases = [([] if "copy" in extra else ["--data", tiny_corpus[1], "--data_dir", tiny_corpus[0]]) + extra +
             ["--out_dir", str(tmp_path / "x"), "--device", "cpu"] for extra in HUGE]
    code = f"""
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
sys.path.insert(0, {str(REPO)!r})
import train
for argv in {cases!r}:
    started = time.time()
    try:
        train.main(argv)
        print("ran", argv)
    except SystemExit as exit_info:
        print(round(time.time() - started), repr(str(exit_info.code)))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(HUGE), result.stdout
    for line, extra in zip(lines, HUGE):
        seconds, message = line.split(" ", 1)
        message = ast.literal_eval(message)
        assert message.startswith("train.py: error:") and "\n" not in message, (extra, message)
        assert int(seconds) < 20, (extra, seconds)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------------------------
# Synthetic tasks and official models through the same loop
# ----------------------------------------------------------------------------------------------------------------

def task_flags(out_dir, *extra):
    return ["--task", "copy", "--out_dir", str(out_dir), "--d_model", "32", "--n_layer", "1", "--d_state", "16",
            "--headdim", "16", "--batch_size", "4", "--eval_seqs", "2", "--eval_interval", "2", "--log_interval", "1",
            "--max_steps", "4", "--chunk_size", "16", "--device", "cpu", *extra]


def test_a_synthetic_task_trains_through_the_same_loop(tmp_path):
    """--task copy: pre-training from zero, post-training with state passing, validation on held-out examples."""
    assert run_main(task_flags(tmp_path / "zero", "--alphabet_size", "26", "--n_train", "32")) is None
    base = load(tmp_path / "zero")
    assert base["step"] == 4 and base["args"]["seq_len"] == 67 and base["corpus"]["task"] == "copy"
    assert base["model_config"]["vocab_size"] == 29  # 26 letters and start, copy, end
    val = [r["val_loss"] for r in read_log(tmp_path / "zero") if "val_loss" in r]
    assert len(val) == 2 and all(0 < v < 5 for v in val)  # a masked cross-entropy over 29 tokens: log 29 = 3.4
    assert run_main(post_flags(task_flags(tmp_path / "sp", "--init", "state_passing", "--init_from",
                                          str(tmp_path / "zero"), "--max_steps", "2"))) is None
    post = load(tmp_path / "sp")
    assert post["step"] == 2 and post["args"]["task"] == "copy"
    assert (post["args"]["alphabet_size"], post["args"]["n_train"], post["args"]["seq_len"]) == (26, 32, 67)
    assert post["ranks"][0]["intervention"]["previous"]["ssm"][0].abs().sum() > 0  # it passed real states
    assert any(not torch.equal(v, base["model"][k]) for k, v in post["model"].items())
    assert "--seq_len" in run_main(task_flags(tmp_path / "x", "--seq_len", "32"))


def test_a_synthetic_task_resumes_exactly(tmp_path):
    flags = lambda out: task_flags(out, "--init", "state_passing", "--from_scratch")  # noqa: E731
    assert run_main(flags(tmp_path / "whole")) is None
    assert run_main(flags(tmp_path / "split") + ["--stop_at", "3"]) is None
    assert run_main(["--resume", "--out_dir", str(tmp_path / "split")]) is None
    whole, split = load(tmp_path / "whole"), load(tmp_path / "split")
    for key, value in whole["model"].items():
        assert torch.equal(value, split["model"][key]), key


def official_layout_folder(folder, vocab_size):
    """A small Mamba-2 written as mamba_ssm writes its official checkpoints (config.json and pytorch_model.bin)."""
    from test_pretrained import MAMBA_SSM_CONFIG, write_mamba_ssm

    config = {**MAMBA_SSM_CONFIG, "vocab_size": vocab_size}
    ssm = config["ssm_cfg"]
    model = LM(ModelConfig(vocab_size=vocab_size, d_model=config["d_model"], n_layer=config["n_layer"],
                           mixer="mamba2", d_state=ssm["d_state"], headdim=ssm["headdim"], ngroups=ssm["ngroups"],
                           pad_vocab_multiple=16, mlp=False))
    return write_mamba_ssm(folder, model.state_dict(), config), model


def test_post_training_a_model_in_the_official_layout(tiny_corpus, tmp_path, monkeypatch):
    """--init_from a folder that pretrained/ reads: the architecture is the folder's, T the one it was trained
    at (here as if its files said 24), the optimizer fresh."""
    folder, original = official_layout_folder(tmp_path / "official", vocab_size=300)
    real = pretrained.load_pretrained

    def trained_at_24(name, *args, **kwargs):
        model = real(name, *args, **kwargs)
        model.trained_on["seq_len"] = 24
        return model

    monkeypatch.setattr(pretrained, "load_pretrained", trained_at_24)
    flags = post_flags(tiny_run_flags(tiny_corpus, tmp_path / "post", "--init", "state_passing", "--init_from",
                                      str(folder), "--max_steps", "2"))
    i = flags.index("--seq_len")
    del flags[i:i + 2]
    assert run_main(flags) is None
    ckpt = load(tmp_path / "post")
    assert ckpt["step"] == 2 and ckpt["args"]["seq_len"] == 24 and ckpt["args"]["init_from"] == str(folder)
    cfg = ckpt["model_config"]
    assert (cfg["d_model"], cfg["n_layer"], cfg["ngroups"], cfg["vocab_size"], cfg["pad_vocab_multiple"]) == \
        (32, 2, 2, 300, 16)
    assert any(not torch.equal(v, original.state_dict()[k]) for k, v in ckpt["model"].items())

    def trained_on_other_tokens(name, *args, **kwargs):  # a model trained on other tokens cannot read the corpus
        model = real(name, *args, **kwargs)
        model.trained_on["tokenizer"] = "EleutherAI/gpt-neox-20b"
        return model

    monkeypatch.setattr(pretrained, "load_pretrained", trained_on_other_tokens)
    error = run_main([str(tmp_path / "p1") if x == str(tmp_path / "post") else x for x in flags])
    assert "EleutherAI/gpt-neox-20b" in error and "python -m corpora" in error
    monkeypatch.setattr(pretrained, "load_pretrained", real)
    small, _ = official_layout_folder(tmp_path / "small", vocab_size=100)
    error = run_main(post_flags(tiny_run_flags(tiny_corpus, tmp_path / "p2", "--init", "tbptt", "--init_from",
                                               str(small))))
    assert "100" in error and "257" in error


def test_an_official_model_named_by_init_from_brings_its_preset(tmp_path, monkeypatch):
    """--init_from state-spaces/mamba2-370m without --preset post-trains with that model's preset (0.5M tokens per
    step, its learning rate), not with the demo's; an explicit --preset still wins."""
    folder, _ = official_layout_folder(tmp_path / "official", vocab_size=300)
    real = pretrained.load_pretrained

    def official_at_2048(name, *args, **kwargs):
        model = real(folder)
        model.trained_on["seq_len"] = 2048
        return model

    monkeypatch.setattr(pretrained, "load_pretrained", official_at_2048)
    argv = ["--init", "state_passing", "--init_from", "state-spaces/mamba2-370m"]
    args, _ = resolve(train.parse(argv))
    assert args.preset == "mamba2-370m" and args.batch_size * args.grad_accum == 256 and args.lr == 3e-4
    args, _ = resolve(train.parse(argv + ["--preset", "demo"]))
    assert args.preset == "demo" and args.batch_size * args.grad_accum == 16
    for name in ("mamba2-130m", "mamba2-370m", "mamba2-780m", "mamba2-1.3b"):
        preset = runs.PRESETS[name]
        assert preset["init_from"] == f"state-spaces/{name}" and preset["seq_len"] == 2048
        assert preset["batch_size"] * preset["grad_accum"] == 256  # 0.5M tokens per step
        assert runs.base_run(train.parse(["--preset", name, "--init", "state_passing"]), train.reads_text) is None
    args, _ = resolve(train.parse(["--init", "state_passing", "--init_from", "fla-hub/gla-1.3B-100B"]))
    assert args.preset == "gla-1.3b" and args.batch_size * args.grad_accum == 256 and args.seq_len == 2048


# ----------------------------------------------------------------------------------------------------------------
# --task passkey: fine-tuning a language model on passkey examples in its own tokenizer
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    """A 2-step pre-trained LM on a corpus prepared with a small BPE tokenizer.json: (run folder, tokenizer file)."""
    from corpora.prepare import prepare
    from test_data import train_bpe

    root = tmp_path_factory.mktemp("bpe_model")
    tokenizer = train_bpe(root / "bpe")
    (root / "words.txt").write_text("".join(f"The sky is blue on day {i}. The grass is green.\n" for i in range(400)))
    prepare(root / "words.txt", name="words", tokenizer=str(tokenizer), data_dir=root / "data")
    out = root / "lm"
    assert run_main(tiny_run_flags((str(root / "data"), "words"), out, "--max_steps", "2")) is None
    return out, tokenizer


def passkey_flags(out_dir, *extra):
    return ["--task", "passkey", "--out_dir", str(out_dir), "--batch_size", "2", "--eval_seqs", "2",
            "--eval_interval", "2", "--log_interval", "1", "--max_steps", "2", "--device", "cpu", *extra]


def test_passkey_fine_tunes_a_model_in_its_own_tokenizer(bpe_model, tmp_path):
    """--task passkey --init fitted_noise --init_from an LM: examples of up to 2048 tokens in the tokenizer of the
    LM's corpus, the loss on the answer only, the tokenizer recorded as a corpus's would be."""
    import re

    from corpora.tokenizer import get_tokenizer
    from tasks import PasskeyTask

    base, tokenizer_file = bpe_model
    out = tmp_path / "fitted_noise"
    assert run_main(passkey_flags(out, "--init", "fitted_noise", "--init_from", str(base))) is None
    ckpt, base_ckpt = load(out), load(base)
    assert ckpt["step"] == 2 and ckpt["args"]["task"] == "passkey" and ckpt["args"]["seq_len"] == 2048
    assert ckpt["corpus"]["tokenizer"] == base_ckpt["corpus"]["tokenizer"] == str(tokenizer_file.resolve())
    assert ckpt["corpus"]["tokenizer_sha256"] == base_ckpt["corpus"]["tokenizer_sha256"] is not None
    assert ckpt["model_config"]["vocab_size"] == base_ckpt["model_config"]["vocab_size"] == 400
    assert any(not torch.equal(v, base_ckpt["model"][k]) for k, v in ckpt["model"].items())
    assert runs.load_model(ckpt).trained_on["tokenizer_sha256"] == base_ckpt["corpus"]["tokenizer_sha256"]
    # the validation loss is the cross-entropy of the answers (" 12345.") alone, recomputed here by hand
    args = argparse.Namespace(**ckpt["args"])
    batches = tasks.TaskBatches(tasks.build(args), args, seed=0)
    model, tokenizer, losses = runs.load_model(ckpt), get_tokenizer(str(tokenizer_file)), []
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


def test_passkey_resumes_exactly_and_defaults_to_the_paper_recipe(bpe_model, tmp_path):
    base, _ = bpe_model
    flags = lambda out: passkey_flags(out, "--init", "state_passing", "--init_from", str(base),  # noqa: E731
                                      "--max_steps", "3", "--eval_interval", "3", "--passkey_filler", "varied")
    assert run_main(flags(tmp_path / "whole")) is None
    assert run_main(flags(tmp_path / "split") + ["--stop_at", "1"]) is None
    assert run_main(["--resume", "--out_dir", str(tmp_path / "split")]) is None
    whole, split = load(tmp_path / "whole"), load(tmp_path / "split")
    for key, value in whole["model"].items():
        assert torch.equal(value, split["model"][key]), key
    assert split["corpus"] == whole["corpus"] and split["args"]["passkey_filler"] == "varied"
    args, _ = resolve(train.parse(["--task", "passkey", "--init_from", str(base)]))
    assert (args.max_steps, tasks.build(args).train_tokens, args.out_dir) == (1000, 2048,
                                                                              os.path.join("out", "passkey", "zero"))


def test_passkey_on_an_official_model_takes_its_preset_and_byte_models_their_bytes(base_run, tmp_path,
                                                                                   monkeypatch):
    folder, _ = official_layout_folder(tmp_path / "official", vocab_size=300)
    real = pretrained.load_pretrained

    def official_in_bytes(name, *args, **kwargs):  # its real tokenizer would be downloaded
        model = real(folder)
        model.trained_on["tokenizer"] = "bytes"
        return model

    monkeypatch.setattr(pretrained, "load_pretrained", official_in_bytes)
    argv = ["--task", "passkey", "--init", "fitted_noise", "--init_from", "state-spaces/mamba2-370m"]
    args, _ = resolve(train.parse(argv))
    assert (args.preset, args.max_steps, args.seq_len, args.batch_size * args.grad_accum, args.lr) == \
        ("mamba2-370m", 1000, 2048, 256, 3e-4)
    assert args.tokenizer == "bytes"
    # a byte-level checkpoint of this project fine-tunes on passkey examples in bytes
    assert run_main(passkey_flags(tmp_path / "bytes", "--init_from", str(base_run), "--max_steps", "1")) is None
    ckpt = load(tmp_path / "bytes")
    assert ckpt["corpus"]["tokenizer"] == "bytes" and ckpt["model_config"]["vocab_size"] == 257


def test_passkey_errors_are_one_line(bpe_model, tmp_path):
    for extra, flag in (([], "--init_from"), (["--init", "fitted_noise"], "--init_from"),
                        (["--from_scratch", "--init", "tbptt"], "--init_from"),
                        (["--init_from", str(bpe_model[0]), "--seq_len", "64"], "--seq_len")):
        assert flag in run_main(passkey_flags(tmp_path / "bad", *extra))
    assert not (tmp_path / "out").exists() and not (tmp_path / "bad").exists()  # nothing pre-trained or written
    assert run_main(task_flags(tmp_path / "copy", "--max_steps", "1")) is None  # a copy model reads no words
    assert "copy" in run_main(passkey_flags(tmp_path / "bad", "--init_from", str(tmp_path / "copy")))
    # a tokenizer.json replaced after the model was trained is refused, not silently used
    tokenizer = bpe_model[1]
    original = tokenizer.read_bytes()
    try:
        tokenizer.write_bytes(original + b"\n")  # the same tokens, but not provably: another sha256
        assert "sha256" in run_main(passkey_flags(tmp_path / "bad", "--init_from", str(bpe_model[0])))
    finally:
        tokenizer.write_bytes(original)


@pytest.mark.core
def test_learning_rate_schedule():
    args = argparse.Namespace(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert train.lr_at(0, args) == pytest.approx(0.1) and train.lr_at(9, args) == pytest.approx(1.0)
    assert train.lr_at(60, args) == pytest.approx(0.55) and train.lr_at(110, args) == pytest.approx(0.1)


def test_every_condition_of_the_copy_experiment_runs(tmp_path):
    """The copy experiment's conditions at toy size: zero-init and state passing from scratch (with copies along
    the way), and post-training with each intervention and its zero-init control."""
    assert run_main(task_flags(tmp_path / "zero", "--max_steps", "2", "--save_every", "1")) is None
    assert run_main(task_flags(tmp_path / "sp_scratch", "--max_steps", "2", "--init", "state_passing",
                               "--from_scratch")) is None
    for init in ("state_passing", "fitted_noise", "random_noise", "zero"):
        assert run_main(post_flags(task_flags(tmp_path / f"post_{init}", "--max_steps", "1", "--init", init,
                                              "--init_from", str(tmp_path / "zero")))) is None
        assert load(tmp_path / f"post_{init}")["args"]["init"] == init
    assert sorted(p.name for p in (tmp_path / "zero").glob("ckpt_*.pt")) == ["ckpt_1.pt", "ckpt_2.pt"]
    assert load(tmp_path / "zero")["args"]["context"] == 0  # one example per row: the unconfounded layout
