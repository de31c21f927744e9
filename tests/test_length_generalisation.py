"""The paper's phenomenon in miniature, on the CPU in seconds: plain linear attention (a state that only grows)
trained from the zero state at T = 16 reads positions beyond T worse than its control (the same model with its
state reset every T tokens), and a short post-training with state passing lowers that loss, where as many more
ordinary steps (the control for the post-training) do not."""
import pytest
import torch

import eval as evaluation
import runs
import train
from data import load_corpus

pytestmark = pytest.mark.core
T = 16


def read_beyond_T(model, sequences):
    """Mean loss over positions [2T, len) of the model and of its control."""
    no_autocast = torch.autocast("cpu", enabled=False)
    losses = evaluation.position_losses(model, sequences, 4096, torch.device("cpu"), no_autocast)
    control = evaluation.control_losses(model, sequences, T, torch.device("cpu"), no_autocast)
    return losses[:, 2 * T:].mean().item(), control[:, 2 * T:].mean().item()


def test_linear_attention_fails_beyond_T_and_state_passing_repairs_it(tiny_corpus, tmp_path):
    data_dir, name = tiny_corpus
    common = ["--data", name, "--data_dir", data_dir, "--device", "cpu", "--log_interval", "1000", "--eval_seqs", "2"]
    train.main(common + ["--mixer", "gla", "--gate", "none", "--d_model", "32", "--n_layer", "1", "--n_heads", "2",
                         "--seq_len", str(T), "--batch_size", "8", "--max_steps", "200", "--eval_interval", "200",
                         "--warmup_steps", "10", "--out_dir", str(tmp_path / "zero")])
    for init in ("state_passing", "zero"):
        train.main(common + ["--init", init, "--init_from", str(tmp_path / "zero"), "--max_steps", "60",
                             "--eval_interval", "60", "--warmup_steps", "5", "--out_dir", str(tmp_path / f"{init}_post")])
    sequences, _ = load_corpus(name, data_dir).eval_sequences(16 * T, 4)
    base, control = read_beyond_T(runs.load_model(tmp_path / "zero"), sequences)
    assert base > control + 0.3  # fails beyond T: the control, which never sees a state beyond T, reads it better
    passed, _ = read_beyond_T(runs.load_model(tmp_path / "state_passing_post"), sequences)
    more, _ = read_beyond_T(runs.load_model(tmp_path / "zero_post"), sequences)
    assert passed < base - 0.2 and passed < more - 0.2  # state passing lowers it; more ordinary training does not
