"""The README's workflow at toy size, through the command line exactly as a user runs it: prepare data, pre-train,
post-train with state passing, evaluate with every diagnostic, and check every output."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOY = ["--d_model", "32", "--n_layer", "2", "--d_state", "16", "--headdim", "16", "--seq_len", "32",
       "--batch_size", "4", "--eval_seqs", "2", "--eval_interval", "3", "--chunk_size", "16"]


def run(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args} failed:\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A fresh folder with a small corpus of real text: some of the standard library's own files."""
    root = tmp_path_factory.mktemp("e2e")
    source = root / "source"
    source.mkdir()
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "string.py", "fnmatch.py", "shlex.py", "glob.py", "bisect.py", "heapq.py",
                 "random.py", "calendar.py", "difflib.py"):
        (source / name).write_text((stdlib / name).read_text())
    run("-m", "corpora", "--input", str(source), "--name", "toy", "--data_dir", str(root / "data"),
        "--val_fraction", "0.3", cwd=root)
    return root


def test_readme_workflow_end_to_end(workdir):
    data = ["--data", "toy", "--data_dir", str(workdir / "data")]
    run(str(REPO / "train.py"), *data, *TOY, "--max_steps", "6", cwd=workdir)  # pre-train -> out/zero
    post = [x for x in data] + ["--max_steps", "3"]
    run(str(REPO / "train.py"), "--init", "state_passing", *post, cwd=workdir)  # -> out/state_passing
    run(str(REPO / "train.py"), "--init", "zero", "--init_from", "out/zero", "--out_dir", "out/zero_control",
        *post, cwd=workdir)
    for name in ("zero", "state_passing", "zero_control"):
        log = [json.loads(line) for line in (workdir / "out" / name / "log.jsonl").read_text().splitlines()]
        assert any("val_loss_beyond_T" in r for r in log)

    result = run(str(REPO / "eval.py"), *data, "--len", "1024", "--num_seqs", "2", "--chunk", "256",
                 "--effrem", "--state_stats", "--passkey", "--passkey_lengths", "64", "128", "--passkey_trials", "1",
                 cwd=workdir)
    assert "[2T,8T)" in result.stdout and "state_passing" in result.stdout
    out = workdir / "eval"
    for name in ("loss_vs_position.png", "loss_vs_position.json", "loss_vs_position.csv", "effrem.png",
                 "effrem.json", "state_stats.png", "state_stats.json", "passkey.png", "passkey.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "loss_vs_position.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out / "loss_vs_position.json").read_text())
    inits = sorted(c["init"] for c in record["checkpoints"])
    assert inits == ["state_passing", "zero", "zero"]  # every run under out/ was found
    for c in record["checkpoints"]:
        assert all(v is not None for v in c["summary"].values())  # 1024 = 32 T reaches every band
        assert all(0 < x < 10 for x in c["bins"]["loss"] + c["bins"]["control"])
    stats = json.loads((out / "state_stats.json").read_text())["checkpoints"][0]
    assert len(stats["norm"]) == 2 and all(v > 0 for v in stats["norm"][0])
    passkey = json.loads((out / "passkey.json").read_text())["checkpoints"][0]
    assert passkey["lengths"] == [64, 128] and len(passkey["accuracy"]) == 2


def test_a_user_tripping_gets_one_line(workdir):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for args, expected in [
        ([str(REPO / "eval.py"), "--data", "toy", "--data_dir", str(workdir / "data"), "--len", "10000000"],
         "lower --num_seqs or --len"),
        ([str(REPO / "train.py"), "--resume", "--out_dir", str(workdir / "nowhere")], "no checkpoint at"),
        (["-m", "corpora", "--input", str(workdir / "nowhere")], "does not exist"),
    ]:
        result = subprocess.run([sys.executable, *args], cwd=workdir, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode != 0 and expected in result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def interrupt(args, cwd, after=None, wait=0.2):
    """Start a script, send it SIGINT (Ctrl-C) once `after` shows on its stderr (None: after `wait` seconds, while it
    still imports), and return (exit status, stderr)."""
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    seen = b""
    if after is None:
        time.sleep(wait)
    else:
        os.set_blocking(process.stderr.fileno(), False)
        deadline = time.time() + 120
        while after.encode() not in seen and time.time() < deadline and process.poll() is None:
            try:
                seen += os.read(process.stderr.fileno(), 65536)
            except BlockingIOError:
                time.sleep(0.05)
        assert after.encode() in seen, seen[-2000:]
        os.set_blocking(process.stderr.fileno(), True)
    process.send_signal(signal.SIGINT)
    rest = process.communicate(timeout=120)[1] or b""
    return process.returncode, (seen + rest).decode(errors="replace")


@pytest.mark.parametrize("script", ["train.py", "eval.py", "-m corpora", "-m bench"])
def test_ctrl_c_while_a_script_starts_is_quiet(workdir, script):
    """script: a file of the repository, or -m and a package of it (found through PYTHONPATH)."""
    args = script.split() if script.startswith("-m ") else [str(REPO / script)]
    code, err = interrupt(args, cwd=workdir)
    assert code == 130 and "Traceback" not in err


def test_ctrl_c_while_eval_reads_is_one_line(workdir):
    data = ["--data", "toy", "--data_dir", str(workdir / "data")]
    run(str(REPO / "train.py"), *data, *TOY, "--max_steps", "2", "--out_dir", "out/interrupted", cwd=workdir)
    code, err = interrupt([str(REPO / "eval.py"), *data, "--ckpt", "out/interrupted", "--len", "8192",
                           "--num_seqs", "4", "--chunk", "64", "--out", "eval_interrupted"], cwd=workdir,
                          after="loss and control")
    assert code == 130 and "Traceback" not in err and err.strip().splitlines()[-1].startswith("eval.py:")
