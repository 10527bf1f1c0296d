import os

import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors through its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from parity_helpers import make_pair  # noqa: E402


@pytest.fixture
def pair():
    """A reference model and a drop-in TRMModel (torch kernels) with the same random weights."""
    return make_pair()
