"""Launching multi-process tests: ``torchrun --standalone`` from pytest, on the CPU with gloo.

A worker is a script in tests/ that calls :func:`init_worker`, does its part, writes what the
test compares with :func:`save_result` (rank 0, or every rank with ``all_ranks``) and ends with
:func:`finish_worker`; the test runs it with :func:`torchrun` and reads the results back.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch

TESTS = Path(__file__).resolve().parent


def torchrun(
    script: str, nproc: int, *args: str, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run ``tests/<script>`` on ``nproc`` processes; fail with the workers' output on error, else
    return the finished run (its ``stdout`` and ``stderr``)."""
    env = dict(os.environ)
    env.setdefault("TRITON_INTERPRET", "1")  # the workers run our Triton kernels like the tests
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(TESTS / script),
        *args,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(
            f"torchrun {script} {' '.join(args)} on {nproc} processes failed "
            f"({done.returncode}):\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
        )
    return done


def init_worker() -> tuple[int, int]:
    """The process group (gloo; CPU) of a worker started by :func:`torchrun`: (rank, world)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    atexit.register(_close_process_group)
    torch.manual_seed(0)
    return dist.get_rank(), dist.get_world_size()


def _close_process_group() -> None:
    """At exit, when the worker did not reach :func:`finish_worker`: every rank done (nothing in
    flight), then the group closed."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def finish_worker() -> NoReturn:
    """End a worker whose work succeeded: every rank done, the group closed, and the process gone
    with status 0 without the interpreter's teardown.

    The teardown can abort a rank after its work succeeded ("terminate called without an active
    exception"; 3 runs in 111 of fsdp_checkpoint_worker.py on 2 cores). A core dump shows why:
    a gloo thread drops the last reference to an async collective's work
    (``~AsyncAllgatherCoalescedWork`` in ``ProcessGroupGloo::runLoop``, FSDP2's all-gather), whose
    output tensors take the GIL to free, after the interpreter began to finalise, and Python ends
    that thread inside a C++ destructor. A barrier first does not help: its work holds the works
    queued before it and is freed in the same thread (seen in a second dump).
    """
    _close_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def save_result(path: str | Path, result: Any, *, all_ranks: bool = False) -> None:
    """Write ``result`` (tensors become lists) as JSON: from rank 0, or from every rank to
    ``<path>.rank<r>`` with ``all_ranks``."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    if not all_ranks and rank != 0:
        return
    target = Path(f"{path}.rank{rank}" if all_ranks else path)
    target.write_text(json.dumps(_plain(result)))


def load_result(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().double().cpu().tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
