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


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random numbers, so a failure reproduces."""
    torch.manual_seed(0)
