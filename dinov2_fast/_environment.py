"""What this machine has: versions, GPUs, which backends run, which comparison libraries are present.

Used by ``dinov2-fast info`` and stamped on every benchmark report. Nothing heavy is imported to
find out: versions come from package metadata and optional libraries are probed with
``importlib.util.find_spec``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys

import torch

from dinov2_fast import _backend, backend_table

__all__ = [
    "OPTIONAL_LIBRARIES",
    "backend_status",
    "environment_variables",
    "gpus",
    "optional_libraries",
    "versions",
]

# Import name -> distribution name, for the libraries the benchmarks can compare against.
OPTIONAL_LIBRARIES = {
    "apex": "apex",
    "liger_kernel": "liger-kernel",
    "flash_attn": "flash-attn",
    "xformers": "xformers",
}
ENVIRONMENT_VARIABLES = (
    "TRITON_INTERPRET",
    _backend.ENV_BACKEND,
    backend_table.ENV_TABLE,
    "CUDA_VISIBLE_DEVICES",
    "DINOV2_FAST_CUDA",
)
NO_GPU = "no CUDA GPU"


def _distribution_version(distribution: str, module: str) -> str | None:
    """The installed version, "installed" if the module is there without metadata, else None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return "installed (version unknown)" if found else None


def versions() -> dict[str, str | None]:
    """Versions of Python, dinov2-fast, torch (and its CUDA and cuDNN), triton and numpy."""
    from dinov2_fast import __version__

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "dinov2_fast": __version__,
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": None if cudnn is None else str(cudnn),
        "triton": _distribution_version("triton", "triton"),
        "numpy": _distribution_version("numpy", "numpy"),
    }


def gpus() -> list[dict[str, object]]:
    """One record per visible CUDA GPU: index, name, compute capability, SM count, memory (GiB)."""
    if not torch.cuda.is_available():
        return []
    records = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        records.append(
            {
                "index": index,
                "name": props.name,
                "compute_capability": f"{props.major}.{props.minor}",
                "sm_count": props.multi_processor_count,
                "memory_GiB": round(props.total_memory / 2**30, 1),
            }
        )
    return records


def backend_status() -> dict[str, dict[str, str]]:
    """For each concrete backend and each device type: "" when it runs there, else why not."""
    has_gpu = torch.cuda.is_available()
    status: dict[str, dict[str, str]] = {}
    for backend in ("torch", *_backend.KERNEL_BACKENDS):
        cuda_reason = _backend.unavailable_reason(backend, torch.device("cuda"))
        if not has_gpu and not cuda_reason:
            cuda_reason = NO_GPU
        status[backend] = {
            "cuda": cuda_reason,
            "cpu": _backend.unavailable_reason(backend, torch.device("cpu")),
        }
    return status


def optional_libraries() -> dict[str, str | None]:
    """Version (or "installed") of each optional comparison library, None where it is missing."""
    return {
        module: _distribution_version(distribution, module)
        for module, distribution in OPTIONAL_LIBRARIES.items()
    }


def environment_variables() -> dict[str, str]:
    """The environment variables that change what dinov2-fast does, where they are set."""
    return {name: os.environ[name] for name in ENVIRONMENT_VARIABLES if name in os.environ}
