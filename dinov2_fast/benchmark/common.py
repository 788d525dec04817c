"""What every benchmark does the same way: provider status, shapes, records, the timing and the
float64 check of one provider at one shape, the loop over shapes and providers, and tables.

A benchmark module (``layer_norm``, ``attention``) keeps only what is its own: its providers, how
it builds inputs and checks outputs, its work model (bytes or FLOPs), its columns and targets.

Providers here are duck-typed: anything with ``name``, ``backend`` (our op's backend, or None for
a comparison), ``gpu_kernel``, ``library`` and ``compiles`` attributes.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from dinov2_fast import _backend
from dinov2_fast.benchmark import BenchContext, Record, Table, dtype_name
from dinov2_fast.benchmark.timing import first_line

__all__ = [
    "NOT_TIMED_NO_GPU",
    "OUT_OF_TIME",
    "PASSES",
    "Unavailable",
    "add_speedups",
    "availability",
    "choose_shapes",
    "error",
    "first_line",
    "itemsize",
    "measure_passes",
    "new_record",
    "number",
    "parse_dims",
    "parse_groups",
    "peak_extra_bytes",
    "percent",
    "provider_table",
    "relative_error",
    "run_providers",
    "speedup",
    "split_shapes",
    "time_call",
    "time_call_graphed",
    "verdict",
    "within",
]

PASSES = ("fwd", "fwd+bwd")
NOT_TIMED_NO_GPU = "not timed: no CUDA GPU"
OUT_OF_TIME = "out of time (--time-limit)"


class Unavailable(Exception):
    """Raised while building or running a case: the provider cannot run it here (the message says
    why). Its records say "skipped", not "error"."""


# --- which providers run here --------------------------------------------------------------------


def _library_missing(library: str) -> bool:
    try:
        return importlib.util.find_spec(library) is None
    except (ImportError, ValueError):
        return True


def availability(
    provider: Any, device: torch.device, *, compile_on_cpu: bool = False, op: str | None = None
) -> tuple[str, str]:
    """``("ok", "")`` when ``provider`` can be timed on ``device`` as far as every benchmark is
    concerned, else ``("skipped" | "not timed", why)``: a missing library, a GPU kernel on the CPU,
    torch.compile on the CPU without ``--compile``, one of our backends that cannot run here
    (``backend="auto"`` always can) or that has no kernel for ``op`` (an ``_backend`` op name)."""
    if provider.library is not None and _library_missing(provider.library):
        return "skipped", f"{provider.library} is not installed"
    if device.type != "cuda":
        if provider.gpu_kernel:
            return "not timed", NOT_TIMED_NO_GPU
        if provider.compiles and not compile_on_cpu:
            return (
                "skipped",
                "slow to compile on the CPU (`dinov2-fast bench --compile` includes it)",
            )
    # "auto" runs everywhere: it picks a kernel on a GPU and the torch reference elsewhere.
    if provider.backend is not None and provider.backend != "auto":
        why = _backend.unavailable_reason(provider.backend, device)
        if why:
            return "skipped", why
        if op is not None and provider.backend not in _backend.AUTO_PREFERENCE[op]:
            return "skipped", f"{op} has no {provider.backend} kernel yet"
    return "ok", ""


# --- shapes --------------------------------------------------------------------------------------


def split_shapes(text: str) -> list[str]:
    """The comma-separated items of ``--shapes``, stripped and lower-cased."""
    return [item.strip().lower() for item in text.split(",")]


def parse_dims(item: str, benchmark: str, names: Sequence[str], form: str, example: str):
    """One ``--shapes`` item such as ``"16448x1024"`` -> ``(16448, 1024)``: ``len(names)`` positive
    integers joined by "x". ValueError naming the benchmark, the form and an example otherwise."""
    parts = item.split("x")
    if len(parts) != len(names) or not all(part.strip().isdigit() for part in parts):
        raise ValueError(
            f"{benchmark} shapes are {form}, comma-separated (e.g. {example}); got {item!r}"
        )
    dims = tuple(int(part) for part in parts)
    if min(dims) < 1:
        need = " and ".join(f"{name} >= 1" for name in names)
        raise ValueError(f"{benchmark} shapes need {need}, got {item!r}")
    return dims


def parse_groups(
    item: str, benchmark: str, example: str
) -> tuple[tuple[tuple[int, int], ...], int]:
    """One ``--shapes`` item of crop groups such as ``"64x257x1024+256x50x1024"`` ->
    ``(((64, 257), (256, 50)), 1024)``: groups ``BxNxC`` joined by "+", all of one C. ValueError
    naming the benchmark, the form and ``example`` otherwise."""
    form = "BxNxC, or crop groups of one C joined by + (BxNxC+BxNxC)"
    dims = [
        parse_dims(group, benchmark, ("B", "N", "C"), form, example) for group in item.split("+")
    ]
    if len({channels for _, _, channels in dims}) != 1:
        raise ValueError(f"{benchmark} crop groups must share C, got {item!r}")
    return tuple((batch, tokens) for batch, tokens, _ in dims), dims[0][2]


def choose_shapes(
    context: BenchContext,
    shapes: Sequence[Any] | None,
    *,
    full: Sequence[Any],
    quick: Sequence[Any],
    cpu: Sequence[Any],
    cpu_scaling: str,
    gpu_kernels: Iterable[str],
) -> tuple[Sequence[Any], list[str]]:
    """The shapes to run and the notes that say why: ``shapes`` when given; else ``quick`` with
    ``--quick``, ``full`` on a GPU and ``cpu`` (``full`` scaled down as ``cpu_scaling`` says) on the
    CPU, where the notes also say that ``gpu_kernels`` were not timed."""
    notes: list[str] = []
    on_gpu = context.device.type == "cuda"
    if shapes is None:
        if context.quick:
            shapes = quick
            notes.append(
                "--quick: small shapes and few repetitions; the numbers are not meaningful"
            )
        elif on_gpu:
            shapes = full
        else:
            shapes = cpu
            notes.append(f"no GPU: the default shapes were scaled down ({cpu_scaling}) for the CPU")
    if not on_gpu:
        notes.append(
            f"GPU kernels ({', '.join(gpu_kernels)}) were not timed: no CUDA GPU. The CPU times of "
            "the torch paths only show that the benchmark runs."
        )
    return shapes, notes


# --- records -------------------------------------------------------------------------------------


def new_record(
    benchmark: str,
    provider: Any,
    pass_: str,
    shape: str,
    status: str,
    dtype: torch.dtype,
    fields: dict[str, Any],
) -> Record:
    """A result record: the fields every benchmark has (see ``dinov2_fast.benchmark``), then the
    benchmark's own ``fields`` (its defaults and values, which may override these)."""
    record: Record = {
        "benchmark": benchmark,
        "provider": provider.name,
        "ours": provider.backend is not None,
        "pass": pass_,
        "shape": shape,
        "dtype": dtype_name(dtype),
        "status": status,
        "ms": None,
        "baseline": None,
        "speedup": None,
        "max_rel_err": None,
        "check": None,
        "host_ms": None,
        "note": "",
    }
    record.update(fields)
    return record


def add_speedups(records: list[Record]) -> None:
    """Each timed record's ``speedup``: its ``baseline`` provider's time at the same shape and pass
    over its own."""
    times = {
        (r["shape"], r["pass"], r["provider"]): r["ms"] for r in records if r["status"] == "ok"
    }
    for record in records:
        baseline_ms = times.get((record["shape"], record["pass"], record["baseline"]))
        if record["status"] == "ok" and baseline_ms:
            record["speedup"] = baseline_ms / record["ms"]


# --- the float64 check ---------------------------------------------------------------------------


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |out - ref| / max |ref|``, with ``ref`` in float64."""
    scale = ref.abs().max().item()
    return (out.double() - ref).abs().max().item() / max(scale, 1e-30)


def within(error: float, tolerance: float) -> bool:
    return math.isfinite(error) and error <= tolerance


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# --- measuring -----------------------------------------------------------------------------------


def time_call(context: BenchContext, fn: Callable[[], object]) -> tuple[float, float | None, str]:
    """``(ms, host_ms, note)`` of ``fn``: the median time, the CPU time to issue one call (CUDA
    only) and a note when the host time says the GPU may have waited (see ``Timer.host_ms``)."""
    ms = context.timer(fn)
    host_ms = context.timer.host_ms(fn)
    note = ""
    if host_ms is not None and host_ms >= 10 * ms and host_ms >= 20:
        # The call waited for the ~50 ms sleep kernel: it synchronizes with the GPU.
        note = "syncs with the GPU in each call: ms includes host work after the sync"
    elif host_ms is not None and host_ms >= 0.9 * ms:
        # Within 10% of the event time: the GPU may have waited for launches.
        note = f"host-bound: {host_ms:.3f} ms to launch"
    return ms, host_ms, note


def time_call_graphed(
    context: BenchContext, fn: Callable[[], object]
) -> tuple[float, float | None, float | None, str]:
    """``(ms, graph_ms, host_ms, note)``: :func:`time_call`'s numbers and the median time of
    replaying ``fn`` captured once in a CUDA graph (``Timer.graph_ms``; CUDA only, else None). When
    the capture fails, ``graph_ms`` is None and the note says why."""
    ms, host_ms, note = time_call(context, fn)
    graph_ms = None
    if context.device.type == "cuda":
        graph_ms, why = context.timer.graph_ms(fn)
        note = "; ".join(part for part in (note, why) if part)
    return ms, graph_ms, host_ms, note


def peak_extra_bytes(device: torch.device, fn: Callable[[], object]) -> int | None:
    """The most memory ``fn`` had allocated at once beyond what was allocated before it, counting
    what it returns (CUDA only; None elsewhere)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak


def _release(device: torch.device) -> None:
    if device.type != "cuda":
        return
    try:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    except Exception:  # a broken CUDA context: the next provider will record its own error
        pass


# A benchmark's record builder: (provider, shape, pass_, status, dtype, **fields) -> Record.
RecordFn = Callable[..., Record]


def measure_passes(
    context: BenchContext,
    provider: Any,
    shape: Any,
    body: Iterator[Record],
    record: RecordFn,
    passes: Sequence[str] = PASSES,
) -> list[Record]:
    """The records ``body`` yields, one per pass in order. If it raises, each pass it did not
    yield becomes a record of ``status`` "skipped" for :class:`Unavailable`, "error" for anything
    else, with the message as its note (one broken provider must not stop the others). Frees the
    GPU's cache after."""
    records: list[Record] = []
    try:
        for done in body:
            records.append(done)
    except Exception as error:
        status, note = (
            ("skipped", str(error))
            if isinstance(error, Unavailable)
            else ("error", first_line(error))
        )
        records += [
            record(provider, shape, pass_, status, context.dtype, note=note)
            for pass_ in passes[len(records) :]
        ]
    _release(context.device)
    return records


def run_providers(
    context: BenchContext,
    shapes: Iterable[Any],
    providers: Sequence[Any],
    *,
    status: Callable[..., tuple[str, str]],
    measure: Callable[[BenchContext, Any, Any], list[Record]],
    record: RecordFn,
    finish_shape: Callable[[list[Record]], None] = add_speedups,
    passes: Sequence[str] | Callable[[Any], Sequence[str]] = PASSES,
) -> list[Record]:
    """Every provider at every shape: ``status(provider, device, dtype, shape, compile_on_cpu=...)``
    says whether it runs; ``measure(context, provider, shape)`` gives its records when it does,
    ``record`` one per pass (with the reason as its note) when it does not, or once ``context`` is
    out of time. ``passes`` may be a function of the shape (benchmarks whose shapes differ in
    passes). Shape by shape, except that the torch.compile providers run after all the others
    (slow to build, they are the first to go when time runs short). ``finish_shape`` completes a
    shape's records (by default their speedups), which are returned shape by shape in provider
    order."""
    shapes = list(shapes)
    by_shape: list[list[Record]] = [[] for _ in shapes]
    for late in (False, True):
        for shape, shape_records in zip(shapes, by_shape):
            for provider in providers:
                if bool(provider.compiles) != late:
                    continue
                state, why = status(
                    provider,
                    context.device,
                    context.dtype,
                    shape,
                    compile_on_cpu=context.compile_on_cpu,
                )
                if state == "ok" and context.out_of_time():
                    state, why = "skipped", OUT_OF_TIME
                if state != "ok":
                    shape_passes = passes(shape) if callable(passes) else passes
                    shape_records += [
                        record(provider, shape, pass_, state, context.dtype, note=why)
                        for pass_ in shape_passes
                    ]
                    continue
                shape_records += measure(context, provider, shape)
    order = {provider.name: i for i, provider in enumerate(providers)}
    records: list[Record] = []
    for shape_records in by_shape:
        shape_records.sort(key=lambda r: order[r["provider"]])
        finish_shape(shape_records)
        records += shape_records
    return records


# --- tables --------------------------------------------------------------------------------------


def number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.0f}%"


def speedup(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def error(value: float | None) -> str:
    """A table cell for a relative error (``max_rel_err``): one significant digit, or "-"."""
    return "-" if value is None else f"{value:.1e}"


def provider_table(
    title: str,
    columns: list[str],
    records: Sequence[Record],
    cells: Callable[[Record], list[str]],
    passes: Sequence[str] = PASSES,
    order: Callable[[Record], Any] | None = None,
) -> Table:
    """One row per timed (or failed) provider x shape x pass, grouped by shape then pass (or sorted
    by ``order``, stably), providers in the order they ran; ``cells`` gives a row. Skipped and
    untimed providers are listed under the table with the reason."""
    result = Table(title, columns)
    left_out: dict[tuple[str, str], list[str]] = {}
    shapes = list(dict.fromkeys(record["shape"] for record in records))
    if order is None:

        def order(r: Record) -> Any:
            return shapes.index(r["shape"]), passes.index(r["pass"])

    ordered = sorted(records, key=order)
    for record in ordered:
        if record["status"] in ("ok", "error"):
            result.rows.append(cells(record))
        else:
            providers = left_out.setdefault((record["status"], record["note"]), [])
            if record["provider"] not in providers:
                providers.append(record["provider"])
    for (status, why), providers in left_out.items():
        prefix = "" if why.startswith(status) else f"{status}: "
        result.notes.append(f"{', '.join(providers)}: {prefix}{why}")
    return result


def verdict(value: float, goal: float, floor: float | None, *, higher_is_better: bool) -> str:
    """ "goal met", "floor met", "below floor" (or "below goal" when there is no floor)."""

    def reaches(limit: float) -> bool:
        return value >= limit if higher_is_better else value <= limit

    if reaches(goal):
        return "goal met"
    if floor is None:
        return "below goal"
    return "floor met" if reaches(floor) else "below floor"
