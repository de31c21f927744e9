"""Test set-up shared by every test file.

TRITON_INTERPRET=1 must be set before triton is first imported: it makes the Triton kernels run on the CPU through
triton's interpreter, which is how the triton backend is tested on machines without a GPU.
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # the tests' models are tiny: more threads only fight over the cores (and with CI's jobs)


@pytest.fixture(autouse=True)
def _seed_and_folder(tmp_path, monkeypatch):
    """Every test starts from the same random numbers, so a failure reproduces, and in a temporary folder of its
    own, so that nothing a test runs (out/, eval/, data/) can land in the user's checkout."""
    torch.manual_seed(0)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A small prepared corpus (byte tokens) for training and evaluation tests: (data_dir, name)."""
    import data

    root = tmp_path_factory.mktemp("corpus")
    lines = [f"def function_{i}(x):\n    return x * {i % 7} + {i % 3}  # line {i}\n" for i in range(1500)]
    (root / "tiny.txt").write_text("".join(lines))
    data.prepare(root / "tiny.txt", name="tiny", data_dir=root / "data")
    return str(root / "data"), "tiny"


def tiny_run_flags(tiny_corpus, out_dir, *extra):
    """Command-line flags of a training run small enough for a test."""
    data_dir, name = tiny_corpus
    return ["--data", name, "--data_dir", data_dir, "--out_dir", str(out_dir), "--d_model", "32", "--n_layer", "1",
            "--d_state", "16", "--headdim", "16", "--seq_len", "16", "--batch_size", "4", "--eval_seqs", "2",
            "--eval_interval", "2", "--log_interval", "1", "--max_steps", "4", "--chunk_size", "16",
            "--device", "cpu", *extra]
