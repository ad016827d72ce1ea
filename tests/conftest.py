import logging
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def shared_data():
    from torchao_mx_ext.zoo import data_dir

    try:
        return data_dir()
    except FileNotFoundError as e:  # a clear failure, not a skip: CI lays shared/ beside the checkout
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny QRs, matmuls and models gain nothing from threads; on a shared, busy 2-core CPU two
    OpenMP threads made a 64 x 64 QR step 100x slower. Use with ``pytest.mark.usefixtures``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
