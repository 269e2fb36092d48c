"""GPU-only checks (`make test-gpu`): collected only when torch sees a GPU; `make test` leaves
this folder out, and `make test-gpu` refuses in one line on a host without one."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        pytest.exit("tests/gpu needs a GPU torch can use (make test-gpu says why there is none)", returncode=2)
