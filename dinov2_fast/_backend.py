"""Which backends can run here, and the choice among them for an op call.

Backends: "torch" (the reference; always available), "triton" (CUDA tensors, or CPU tensors when
Triton runs under ``TRITON_INTERPRET=1``), "cuda" (the compiled extension ``dinov2_fast._C``).
"auto" picks per op and device from ``AUTO_PREFERENCE``; ``DINOV2_FAST_BACKEND`` overrides "auto"
for CUDA tensors everywhere.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "cuda", "torch")
KERNEL_BACKENDS = ("triton", "cuda")
ENV_BACKEND = "DINOV2_FAST_BACKEND"

# The order "auto" tries on CUDA tensors; bench/RESULTS.md has the H100 runs behind it.
AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {
    # Unmeasured: on the H100 both kernel backends were host-bound (RESULTS.md, LayerNorm).
    "layer_norm": ("triton", "cuda", "torch"),
    # No CUDA kernel yet. In a ViT-L block step Triton and SDPA tie (RESULTS.md, block), though
    # cuDNN wins attention alone: to revisit when the backward is tuned.
    "attention": ("triton", "torch"),
    # Stochastic depth: Triton 1.9x to 5.4x faster than torch on the GPU; no CUDA kernels yet.
    "index_select_cat": ("triton", "torch"),
    "scaled_index_add": ("triton", "torch"),
    "index_select_layer_norm": ("triton", "torch"),
    # DINO/iBOT head + loss: the torch reference materialises [R, K] logits (GiBs at K = 131072).
    "prototype_cross_entropy": ("triton", "torch"),
}

BUILD_HINT = (
    "reinstall with a CUDA toolkit on PATH: `DINOV2_FAST_CUDA=1 pip install --no-build-isolation "
    "-e .` (set CUDACXX or CUDA_HOME if nvcc is elsewhere)"
)


@functools.cache
def _import_extension() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module("dinov2_fast._C"), ""
    except ImportError as error:
        return None, f"the CUDA extension dinov2_fast._C is not built ({error})"


def cuda_extension() -> ModuleType:
    """The compiled extension, or a RuntimeError that says how to build it."""
    module, why = _import_extension()
    if module is None:
        raise RuntimeError(f"backend='cuda' needs {why}; {BUILD_HINT}")
    return module


@functools.cache
def _import_triton() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return False, f"triton is not installed ({error})"
    return True, ""


def triton_interpreted() -> bool:
    """True when our Triton kernels run in the interpreter (TRITON_INTERPRET=1 at their import)."""
    if not _import_triton()[0]:
        return False
    from dinov2_fast import kernels

    return kernels.INTERPRETED


def unavailable_reason(backend: str, device: torch.device) -> str:
    """Why ``backend`` cannot run on ``device``, or "" when it can."""
    if backend == "torch":
        return ""
    if backend == "triton":
        ok, why = _import_triton()
        if not ok:
            return why
        if device.type == "cuda":
            return ""
        if device.type == "cpu" and triton_interpreted():
            return ""
        return (
            f"backend='triton' runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 is "
            f"set before dinov2_fast's kernels are imported; got a {device.type} tensor"
        )
    if backend == "cuda":
        module, why = _import_extension()
        if module is None:
            return f"{why}; {BUILD_HINT}"
        if device.type != "cuda":
            return f"backend='cuda' needs CUDA tensors, got a {device.type} tensor"
        return ""
    raise ValueError(f"unknown backend {backend!r}")


def check_name(backend: object, where: str = "backend") -> str:
    """``backend`` if it is one of BACKENDS, else a ValueError naming ``where``."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(
            f"{where} must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}"
        )
    return backend


# torch.compile runs this at trace time and keeps the answer as a constant (it only reads the
# environment and what is installed), instead of tracing into imports and caches.
@torch.compiler.assume_constant_result
def resolve(op: str, backend: str, device: torch.device) -> str:
    """The concrete backend for one call of ``op`` on ``device``; raises if it cannot run there."""
    check_name(backend, "backend")
    implemented = AUTO_PREFERENCE[op]
    if backend == "auto" and device.type == "cuda":
        override = check_name(os.environ.get(ENV_BACKEND, "auto"), ENV_BACKEND)
        # A global override names a backend this op may not have: then "auto" decides.
        backend = override if override in implemented else "auto"
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        for candidate in AUTO_PREFERENCE[op]:
            if not unavailable_reason(candidate, device):
                return candidate
        return "torch"
    if backend not in implemented:
        raise ValueError(
            f"backend={backend!r} has no {op} kernel yet; use one of "
            f"{', '.join(map(repr, implemented))}"
        )
    why = unavailable_reason(backend, device)
    if why:
        raise RuntimeError(why)
    return backend
