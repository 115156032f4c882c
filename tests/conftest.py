"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread for the module (``pytestmark = pytest.mark.usefixtures(...)``).

    The CI box is 2 shared cores: for the small tensors of these tests a second OpenMP thread
    only adds synchronisation (20x slower steps on a busy machine), and one thread keeps the
    tiny training runs bit-reproducible.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
