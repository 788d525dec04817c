"""Tensors that end (or start) at an inaccessible page: an emulated kernel that reads past the end
of its input (or before its start) faults at once, as compute-sanitizer's memcheck would report
on a GPU. The emulator itself does not check global memory; this catches the common case, a
ragged tail read whole.

Only the tensors made here are guarded: what an op allocates itself (outputs, workspaces) is not.
A fault kills the process, so run the ops that read guarded tensors in a subprocess.
"""

from __future__ import annotations

import ctypes
import mmap

import torch

_PROT_NONE = 0
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def guarded(values: torch.Tensor, side: str = "end") -> torch.Tensor:
    """A contiguous CPU copy of ``values`` whose bytes end exactly where an inaccessible page
    begins (``side="end"``), or start right after one (``side="start"``)."""
    if side not in ("end", "start"):
        raise ValueError(f"side must be 'end' or 'start', got {side!r}")
    nbytes = values.numel() * values.element_size()
    page = mmap.PAGESIZE
    data_pages = -(-nbytes // page) or 1
    buffer = mmap.mmap(-1, (data_pages + 1) * page)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    if side == "end":
        guard, offset = base + data_pages * page, data_pages * page - nbytes
    else:
        guard, offset = base, page
    if _libc.mprotect(guard, page, _PROT_NONE) != 0:
        raise OSError(ctypes.get_errno(), "mprotect of the guard page failed")
    flat = torch.frombuffer(buffer, dtype=values.dtype, count=values.numel(), offset=offset)
    tensor = flat.view(values.shape)
    tensor.copy_(values)
    # The mmap must outlive the tensor (frombuffer keeps the buffer alive through the storage).
    return tensor
