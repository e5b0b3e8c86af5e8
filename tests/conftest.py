"""Fixtures shared by the test modules: global state a test changes is put back after it."""

import pytest
import torch

from rnnlm_ext import ops


@pytest.fixture
def num_threads():
    """set_num_threads for the rest of the test; the count before it is restored after it."""
    previous = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(previous)


@pytest.fixture(params=ops.CUDA_PATHS)
def cuda_path(request):
    """Each implementation of the CUDA time loop in turn, forced for the whole test."""
    with ops.force_cuda_path(request.param):
        yield request.param
