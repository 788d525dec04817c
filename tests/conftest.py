"""Test setup: without a GPU, Triton kernels run in the interpreter on CPU tensors, and the
``emulated_cuda`` fixture runs the CUDA kernels of csrc/ in a CPU emulator (tests/cuda_emulator).

TRITON_INTERPRET must be set before the @triton.jit decorators run, i.e. before dinov2_fast's
kernels are imported; torch does not import triton, so setting it here is early enough.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_seed():
    """A different but reproducible random stream per test."""
    torch.manual_seed(0x5EED)


@pytest.fixture(scope="session")
def emulated_cuda_extension():
    """The CUDA kernels of csrc/ built for the CPU emulator (tests/cuda_emulator), once per
    session. Skips when DINOV2_FAST_CUDA_EMULATOR=0; fails when g++ or the CUDA headers are
    missing (CI has both)."""
    import cuda_emulator

    if not cuda_emulator.enabled():
        pytest.skip(f"{cuda_emulator.ENV_SWITCH}=0: the emulated CUDA tests are off")
    return cuda_emulator.load_emulated_extension()


@pytest.fixture
def emulated_cuda(emulated_cuda_extension):
    """During the test, ``backend="cuda"`` runs the emulated CUDA kernels on CPU tensors; yields
    the emulated extension module (the functions of dinov2_fast._C, on host addresses)."""
    from dinov2_fast import _backend

    with _backend.emulate_cuda_extension(emulated_cuda_extension):
        yield emulated_cuda_extension
