"""A newcomer's fork: a training option and a new --init strategy, each added by editing two places in a copy of
the project, then used from the command line (the README's promise to forkers)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
PROJECT = ["model.py", "scan_kernels.py", "interventions.py", "train.py", "eval.py", "data.py", "runs", "corpora", "tasks",
           "pretrained", "plots", "delta_rule"]


def insert(path, anchor, text, before=False):
    """One edit: text inserted right after (or before) the one line of path that starts with anchor."""
    lines = path.read_text().splitlines(keepends=True)
    at = [i for i, line in enumerate(lines) if line.lstrip().startswith(anchor)]
    assert len(at) == 1, (anchor, at)
    lines.insert(at[0] + (0 if before else 1), text)
    path.write_text("".join(lines))


@pytest.fixture
def fork(tmp_path):
    root = tmp_path / "fork"
    root.mkdir()
    for name in PROJECT:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, root / name)
    return root


def train(fork, tiny_corpus, out, *extra):
    from conftest import tiny_run_flags

    result = subprocess.run([sys.executable, "train.py", *tiny_run_flags(tiny_corpus, out, "--max_steps", "2"),
                             *extra], cwd=fork, capture_output=True, text=True, timeout=300)
    return result.returncode, result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""


def test_a_training_option_with_default_zero_is_two_edits(fork, tiny_corpus, tmp_path):
    """A field of TrainConfig (default 0: off) and its use in train_step; nothing else."""
    insert(fork / "train.py", "grad_clip: float = option(",
           '    clip_value: float = option(0.0, "clip each gradient element to +- this (0: off)")\n')
    insert(fork / "train.py", "run.optimizer.step()",
           "    if args.clip_value > 0:\n"
           "        torch.nn.utils.clip_grad_value_(run.model.parameters(), args.clip_value)\n", before=True)
    assert train(fork, tiny_corpus, tmp_path / "off")[0] == 0  # the default, 0, is a valid value
    assert train(fork, tiny_corpus, tmp_path / "on", "--clip_value", "1e-4")[0] == 0
    off, on = (torch.load(tmp_path / name / "ckpt.pt", weights_only=True) for name in ("off", "on"))
    assert off["args"]["clip_value"] == 0.0 and on["args"]["clip_value"] == 1e-4
    assert any(not torch.equal(off["model"][k], on["model"][k]) for k in off["model"])  # it changed the training


def test_an_init_strategy_with_an_option_of_its_own_is_two_edits(fork, tiny_corpus, tmp_path):
    """A class in interventions.py with its option, and its entry in INITS: the flag, its help, its refusal for
    another --init and its place in the checkpoint come with it."""
    insert(fork / "interventions.py", "INITS = {", '''class ShrunkStatePassing(StatePassing):
    """State passing with the passed SSM state scaled down."""

    options = {**StatePassing.options, "shrink": (0.5, "scale of the passed SSM state")}

    def propose(self, batch_size, device, restarted):
        state = super().propose(batch_size, device, restarted)
        return None if state is None else State([s * self.shrink for s in state.ssm], state.conv)


''', before=True)
    insert(fork / "interventions.py", '"tbptt": TBPTT}', 'INITS["shrunk"] = ShrunkStatePassing\n')
    code, last = train(fork, tiny_corpus, tmp_path / "shrunk", "--init", "shrunk", "--shrink", "0.25",
                       "--from_scratch")
    assert code == 0, last
    ckpt = torch.load(tmp_path / "shrunk" / "ckpt.pt", weights_only=True)
    assert ckpt["args"]["init"] == "shrunk" and ckpt["args"]["shrink"] == 0.25
    assert ckpt["ranks"][0]["intervention"]["previous"] is not None  # it passed states
    code, last = train(fork, tiny_corpus, tmp_path / "tbptt", "--init", "tbptt", "--shrink", "0.25",
                       "--from_scratch")
    assert code == 1 and "--shrink" in last and "shrunk" in last
    help_text = subprocess.run([sys.executable, "train.py", "--help"], cwd=fork, capture_output=True,
                               text=True).stdout
    assert "--shrink" in help_text and "scale of the passed SSM state" in help_text
