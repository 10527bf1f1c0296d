import pytest

from parity_helpers import make_pair


@pytest.fixture
def pair():
    """A reference model and a drop-in TRMModel (torch kernels) with the same random weights."""
    return make_pair()
