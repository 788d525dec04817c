"""Benchmarks of dinov2-fast's ops against torch and other libraries: what ``dinov2-fast bench`` runs.

Each benchmark is a module that defines ``BENCHMARK``, a :class:`Benchmark` (its name, how to read
``--shapes``, how to run, and how to tabulate its results); what they all do the same way (provider
status, records, the measuring loop, tables) is in ``dinov2_fast.benchmark.common``.
:data:`REGISTRY` maps names to those modules, imported only when used. :func:`run` times the chosen
benchmarks on one device and returns a JSON-ready report::

    {"device": ..., "torch": ..., "triton": ..., "copy_bandwidth_GBps": ..., "notes": [...],
     "results": [{"benchmark": "layernorm", "provider": "triton", "pass": "fwd+bwd", ...}, ...]}

Every result record has at least ``benchmark``, ``provider``, ``ours`` (one of dinov2-fast's own
kernels), ``pass``, ``shape``, ``dtype``, ``status`` ("ok", "skipped" (also when out of time),
"not timed" or "error"), ``ms``, ``baseline`` and ``speedup``, ``max_rel_err``, ``check`` ("ok",
"MISMATCH" against a reference, or None when not run), ``host_ms`` and ``note``; each benchmark
adds its own.

Nothing here prints: progress goes to the ``progress`` callback, tables are returned as
:class:`Table` for the caller to render.
"""

from __future__ import annotations

import datetime
import importlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dinov2_fast import _environment
from dinov2_fast.benchmark.timing import Timer, copy_bandwidth_gbps

__all__ = [
    "DTYPES",
    "REGISTRY",
    "BenchContext",
    "Benchmark",
    "Table",
    "Timer",
    "copy_bandwidth_gbps",
    "dtype_name",
    "get",
    "run",
]

Record = dict[str, Any]

# --dtype names and the dtypes they stand for.
DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}

# Benchmark name -> the module that defines its BENCHMARK. Imported on first use.
REGISTRY: dict[str, str] = {
    "layernorm": "dinov2_fast.benchmark.layer_norm",
    "attention": "dinov2_fast.benchmark.attention",
    "stochastic-depth": "dinov2_fast.benchmark.stochastic_depth",
    "block": "dinov2_fast.benchmark.block",
    "head-loss": "dinov2_fast.benchmark.head_loss",
    "model": "dinov2_fast.benchmark.model",
    "train-step": "dinov2_fast.benchmark.train_step",
}


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a dtype: "bf16", "fp16", "fp32", or torch's name for any other."""
    for name, candidate in DTYPES.items():
        if candidate == dtype:
            return name
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class BenchContext:
    """What every benchmark is run with.

    Attributes:
        device: where to run; on a CPU only the torch providers are timed.
        dtype: the activation dtype (the autocast dtype for the autocast comparisons).
        quick: small shapes and few repetitions (tests, CI).
        timer: measures one call's median time in ms.
        copy_gbps: the device's measured copy bandwidth (read + written), the bandwidth ceiling.
        compile_on_cpu: include torch.compile providers on the CPU (slow to compile).
        progress: called with one line before each measurement, or None.
        deadline: a ``time.monotonic()`` after which no new measurement starts, or None.
    """

    device: torch.device
    dtype: torch.dtype
    quick: bool
    timer: Timer
    copy_gbps: float
    compile_on_cpu: bool = False
    progress: Callable[[str], None] | None = None
    deadline: float | None = None

    def say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def seconds_left(self) -> float | None:
        """Seconds until the deadline (negative past it), or None without one."""
        return None if self.deadline is None else self.deadline - time.monotonic()


@dataclass
class Table:
    """A table for the caller to render: cells are strings, ``notes`` go under it."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Benchmark:
    """One benchmark.

    Attributes:
        name: its name on the command line and in the results' "benchmark" field.
        summary: one line for ``--help``.
        shapes_help: the form ``--shapes`` takes for it, e.g. "ROWSxD,...".
        parse_shapes: reads ``--shapes`` text into the benchmark's own shapes (tuples of ints for
            layernorm); raises ValueError saying what was wrong.
        run: ``(context, shapes or None for the defaults) -> (results, notes)``.
        table: results (as loaded from JSON) -> the full table.
        headline: results -> the few numbers that matter against the targets, or None.
    """

    name: str
    summary: str
    shapes_help: str
    parse_shapes: Callable[[str], list[Any]]
    run: Callable[[BenchContext, Sequence[Any] | None], tuple[list[Record], list[str]]]
    table: Callable[[Sequence[Record]], Table]
    headline: Callable[[Sequence[Record]], Table | None]


def get(name: str) -> Benchmark:
    """The benchmark called ``name``; ValueError naming the known ones otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name]).BENCHMARK


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def run(
    names: Sequence[str],
    *,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    quick: bool = False,
    shapes: dict[str, list[Any]] | None = None,
    compile_on_cpu: bool = False,
    progress: Callable[[str], None] | None = None,
    time_limit_s: float | None = None,
) -> Record:
    """Run the named benchmarks (every registered one when ``names`` is empty) on ``device``.

    Args:
        shapes: per benchmark name, shapes that replace its defaults (as ``parse_shapes`` returns).
        time_limit_s: start no new measurement after this many seconds; what is left is recorded
            as skipped, "out of time", so a report is written even when the time runs short.

    Returns the JSON-ready report described in the module docstring.
    """
    benchmarks = [get(name) for name in (names or list(REGISTRY))]
    deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
    timer = Timer.for_device(device, quick=quick)
    if progress is not None:
        progress("measuring the copy bandwidth")
    copy_gbps = copy_bandwidth_gbps(timer, None if not quick or device.type == "cuda" else 16 << 20)
    context = BenchContext(
        device, dtype, quick, timer, copy_gbps, compile_on_cpu, progress, deadline
    )
    versions = _environment.versions()
    report: Record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_description(device),
        "device_type": device.type,
        "gpus": _environment.gpus() if device.type == "cuda" else [],
        "dinov2_fast": versions["dinov2_fast"],
        "python": versions["python"],
        "torch": versions["torch"],
        "torch_cuda": versions["torch_cuda"],
        "cudnn": versions["cudnn"],
        "triton": versions["triton"],
        "environment": _environment.environment_variables(),
        "dtype": dtype_name(dtype),
        "quick": quick,
        "time_limit_s": time_limit_s,
        "copy_bandwidth_GBps": round(copy_gbps, 1),
        "benchmarks": [benchmark.name for benchmark in benchmarks],
        "notes": [],
        "results": [],
    }
    for benchmark in benchmarks:
        results, notes = benchmark.run(context, (shapes or {}).get(benchmark.name))
        report["results"].extend(results)
        report["notes"].extend(f"{benchmark.name}: {note}" for note in notes)
    return report
