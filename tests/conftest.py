"""Test set-up shared by every test file.

TRITON_INTERPRET=1 must be set before triton is first imported: it makes the Triton kernels run on the CPU through
triton's interpreter, which is how the triton backend is tested on machines without a GPU. The interpreter's tl.dot
is then patched to multiply bfloat16 correctly (_widen_bfloat16_in_interpreted_dot): test-only support, which is why
it lives here and not in scan_kernels.py.
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # the tests' models are tiny: more threads only fight over the cores (and with CI's jobs)


def pytest_configure(config):
    config.addinivalue_line("markers", "core: the fast tier, the definitions of the five core files (README: Tests)")


def _widen_bfloat16_in_interpreted_dot():
    """Make tl.dot correct for bfloat16 under TRITON_INTERPRET=1 (how CI runs the kernels on CPU).

    triton's CPU interpreter stores bfloat16 as its raw 16 bits and multiplies those bits in tl.dot. Widening them
    to float32 first (a bfloat16 is the top half of a float32) gives the products the GPU computes. The kernels
    themselves are untouched; only the interpreter's dot is wrapped, and only when it has the expected shape.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "create_dot") or getattr(builder, "_bf16_widened", False):
        return
    original_dot = builder.create_dot

    def widen(x):
        if x.dtype == tl.bfloat16 and x.data.dtype == np.uint16:
            return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return x

    def create_dot(self, a, b, *args, **kwargs):
        return original_dot(self, widen(a), widen(b), *args, **kwargs)

    builder.create_dot, builder._bf16_widened = create_dot, True


try:  # triton is optional: the triton tests skip (or fail, on Linux) without it, the others still run
    import triton  # noqa: E402, F401
except ImportError:
    pass
else:
    if os.environ.get("TRITON_INTERPRET") == "1":
        _widen_bfloat16_in_interpreted_dot()


@pytest.fixture(autouse=True)
def _seed_and_folder(tmp_path, monkeypatch):
    """Every test starts from the same random numbers, so a failure reproduces, and in a temporary folder of its
    own, so that nothing a test runs (out/, eval/, data/) can land in the user's checkout."""
    torch.manual_seed(0)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A small prepared corpus (byte tokens) for training and evaluation tests: (data_dir, name)."""
    from corpora.prepare import prepare

    root = tmp_path_factory.mktemp("corpus")
    lines = [f"def function_{i}(x):\n    return x * {i % 7} + {i % 3}  # line {i}\n" for i in range(1500)]
    (root / "tiny.txt").write_text("".join(lines))
    prepare(root / "tiny.txt", name="tiny", data_dir=root / "data")
    return str(root / "data"), "tiny"


def tiny_run_flags(tiny_corpus, out_dir, *extra):
    """Command-line flags of a training run small enough for a test."""
    data_dir, name = tiny_corpus
    return ["--data", name, "--data_dir", data_dir, "--out_dir", str(out_dir), "--d_model", "32", "--n_layer", "1",
            "--d_state", "16", "--headdim", "16", "--seq_len", "16", "--batch_size", "4", "--eval_seqs", "2",
            "--eval_interval", "2", "--log_interval", "1", "--max_steps", "4", "--chunk_size", "16",
            "--device", "cpu", *extra]
