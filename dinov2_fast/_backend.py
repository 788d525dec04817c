"""Which backends can run here, and the choice among them for an op call.

Backends: "torch" (the reference; always available), "triton" (CUDA tensors, or CPU tensors when
Triton runs under ``TRITON_INTERPRET=1``), "cuda" (the compiled extension ``dinov2_fast._C``; in
tests, its CPU emulation on CPU tensors: ``emulate_cuda_extension``).
"auto" on CUDA tensors takes the fastest backend the measured table (``backend_table``) has for
the call's shape class, else the first available in ``AUTO_PREFERENCE``; ``DINOV2_FAST_BACKEND``
overrides "auto" for CUDA tensors everywhere.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "cuda", "torch")
KERNEL_BACKENDS = ("triton", "cuda")
ENV_BACKEND = "DINOV2_FAST_BACKEND"

# The order "auto" tries on CUDA tensors; bench/RESULTS.md has the H100 runs behind it.
AUTO_PREFERENCE: dict[str, tuple[str, ...]] = {
    # Unmeasured: on the H100 both kernel backends were host-bound (RESULTS.md, LayerNorm).
    "layer_norm": ("triton", "cuda", "torch"),
    # In a ViT-L block step Triton and SDPA tie (RESULTS.md, block). The CUDA kernels (fp16/bf16
    # only) are unmeasured: the measured table (backend_table) decides when it has a row.
    "attention": ("triton", "cuda", "torch"),
    # Stochastic depth: Triton 1.9x to 5.4x faster than torch on the GPU. The CUDA kernels are
    # unmeasured: after Triton until a GPU run says otherwise.
    "index_select_cat": ("triton", "cuda", "torch"),
    "scaled_index_add": ("triton", "cuda", "torch"),
    "index_select_layer_norm": ("triton", "cuda", "torch"),
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


# Set by emulate_cuda_extension: the CPU build of the CUDA kernels that the tests run.
_emulated_extension: ModuleType | None = None


@contextlib.contextmanager
def emulate_cuda_extension(module: ModuleType | None) -> Iterator[None]:
    """Test hook: inside it, ``backend="cuda"`` runs ``module`` (tests/cuda_emulator's CPU build
    of the CUDA kernels, which takes host addresses) on CPU tensors, and CUDA tensors cannot use
    it. ``None`` restores the installed extension. "auto" still picks torch on CPU tensors."""
    global _emulated_extension
    previous, _emulated_extension = _emulated_extension, module
    try:
        yield
    finally:
        _emulated_extension = previous


def cuda_extension() -> ModuleType:
    """The compiled extension (or the emulated one, see emulate_cuda_extension), or a RuntimeError
    that says how to build it."""
    if _emulated_extension is not None:
        return _emulated_extension
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
        if _emulated_extension is not None:
            on_cpu = device.type == "cpu"
            return "" if on_cpu else f"the emulated CUDA extension takes CPU tensors, got {device}"
        module, why = _import_extension()
        if module is None:
            return f"{why}; {BUILD_HINT}"
        if device.type != "cuda":
            return f"backend='cuda' needs CUDA tensors, got a {device.type} tensor"
        return ""
    raise ValueError(f"unknown backend {backend!r}")


# What an op's cuda backend passes to the extension's launchers, so that the same code serves the
# GPU and the emulated extension on CPU tensors.


def cuda_stream(device: torch.device) -> int:
    """The handle of the current stream on ``device`` for the launchers; 0 on the CPU."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def cuda_address(tensor: torch.Tensor | None) -> int:
    """The address a launcher takes for ``tensor``: 0 for an absent (None) or empty one."""
    return 0 if tensor is None or tensor.numel() == 0 else tensor.data_ptr()


def device_index(device: torch.device) -> int:
    """The CUDA device ordinal of ``device`` (the current one if it has none); 0 on the CPU."""
    if device.type != "cuda":
        return 0
    return device.index if device.index is not None else torch.cuda.current_device()


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Makes ``device`` current around a launch (``torch.cuda.device``); nothing on the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


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
def resolve(op: str, backend: str, device: torch.device, shape_class: str | None = None) -> str:
    """The concrete backend for one call of ``op`` on ``device``; raises if it cannot run there.
    ``shape_class`` (``backend_table.shape_class``) lets "auto" consult the measured table."""
    check_name(backend, "backend")
    implemented = AUTO_PREFERENCE[op]
    if backend == "auto" and device.type == "cuda":
        override = check_name(os.environ.get(ENV_BACKEND, "auto"), ENV_BACKEND)
        # A global override names a backend this op may not have: then "auto" decides.
        backend = override if override in implemented else "auto"
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        if shape_class is not None:
            from dinov2_fast import backend_table

            available = [c for c in implemented if not unavailable_reason(c, device)]
            measured = backend_table.auto_choice(op, shape_class, available, device)
            if measured is not None:  # else the table has no row for it: the fixed order below
                return measured
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
