import os
import sys

import pytest
import torch

# Tests run single-process on 2-core CI machines: keep intra-op threads at the machine's count but
# make the suite reproducible (fixed seed per test).
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
