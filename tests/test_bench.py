"""python -m bench refuses a flag that its job does not read, as train.py and eval.py do, instead of starting a
multi-minute benchmark that ignores it."""
import pytest

import runs
from bench.__main__ import main


@pytest.mark.parametrize("argv,flag", [
    (["--len", "4096"], "--len"), (["--num_seqs", "2"], "--num_seqs"), (["--model", "mamba2-130m"], "--model"),
    (["--eval", "--repeats", "2"], "--repeats"), (["--eval", "--device", "cuda"], "--device"),
    (["--estimate", "--eval"], "--eval"), (["--estimate", "--len", "8"], "--len"),
    (["--delta", "--eval"], "--eval"), (["--delta", "--device", "cuda"], "--device"),
])
def test_flags_the_job_does_not_read_are_refused(argv, flag, capsys):
    with pytest.raises(runs.UsageError, match=flag):
        main(argv)
    assert capsys.readouterr().out == ""  # refused before any table started


def test_the_public_fla_checkpoints_are_estimated_at_their_own_sizes():
    """The fla presets' estimates are made on the checkpoints' architecture (pretrained.fla.PUBLIC), not the demo's:
    DeltaNet 1.3B has 1,365,677,056 parameters and Gated DeltaNet 340M 366,763,296 (its tied output layer once), of
    which 24 layers x 4 heads are the attn.D that fla created but never read, dropped on loading."""
    import torch

    from bench.__main__ import preset_run
    from model import LM

    for name, mixer, parameters in (("deltanet-1.3b", "deltanet", 1_365_677_056),
                                    ("gated-deltanet-340m", "gated_deltanet", 366_763_296 - 24 * 4)):
        cfg, args = preset_run(name)
        with torch.device("meta"):
            assert cfg.mixer == mixer and LM(cfg).num_parameters() == parameters
        assert cfg.recompute and args.seq_len == 2048 and args.batch_size * args.grad_accum == 256

