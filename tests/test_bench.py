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
