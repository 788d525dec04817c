"""Timers for the benchmarks, and the copy bandwidth that bandwidth-bound kernels are judged against.

On a CUDA device a measurement is the median of ``triton.testing.do_bench`` (CUDA events around each
call, the L2 cache flushed before each one), in milliseconds. On the CPU it is the median of a
``time.perf_counter`` loop: useful to check that the benchmark runs, not to judge GPU kernels.

CUDA-graph mode (:meth:`Timer.graph_ms`): small ops are host-bound on a GPU (each launch costs the
CPU tens of microseconds), so the event time of an eager call measures the launches, not the
kernels. Captured once in a ``torch.cuda.CUDAGraph``, the same work replays with one launch, and
the median of ``graph.replay`` is the kernels' time. The eager time stays the number a training
loop sees; the graph time is what the kernels cost.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "CapturedGraph",
    "Timer",
    "capture_cuda_graph",
    "copy_bandwidth_gbps",
    "first_line",
    "synchronized",
]


@dataclass(frozen=True)
class Timer:
    """Measures the median time of one call of a function, in milliseconds.

    Attributes:
        device: where the timed work runs; CUDA uses ``do_bench``, anything else a wall clock.
        warmup_ms, rep_ms: ``do_bench``'s warm-up and repetition budgets (CUDA).
        cpu_warmup: untimed calls first (CPU).
        cpu_reps: at most this many timed calls (CPU), at least 3 ...
        cpu_budget_s: ... stopping early once the timed calls have taken this long.
    """

    device: torch.device
    warmup_ms: int = 25
    rep_ms: int = 100
    cpu_warmup: int = 2
    cpu_reps: int = 20
    cpu_budget_s: float = 0.5

    @classmethod
    def for_device(cls, device: torch.device, *, quick: bool = False) -> Timer:
        """The default timer for ``device``; ``quick`` trades precision for speed (tests, CI)."""
        if quick:
            return cls(device, warmup_ms=5, rep_ms=20, cpu_warmup=1, cpu_reps=3, cpu_budget_s=0.1)
        return cls(device)

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            return self._cuda(fn)
        return self._cpu(fn)

    def host_ms(self, fn: Callable[[], object], calls: int = 10) -> float | None:
        """CPU time to issue one call of ``fn`` while the GPU is busy elsewhere, in ms (CUDA only).

        When this comes near the CUDA-event time, the GPU waits for the CPU between launches and
        the event time is the launch overhead, not the kernels': the benchmark says so. A call that
        synchronizes with the GPU shows up here as about the length of the sleep kernel (~50 ms).
        """
        if self.device.type != "cuda":
            return None
        with torch.cuda.device(self.device):
            fn()
            torch.cuda.synchronize()
            torch.cuda._sleep(100_000_000)  # ~50 ms of GPU clock cycles, so the launches queue up
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            elapsed = time.perf_counter() - start
            torch.cuda.synchronize()
        return elapsed / calls * 1e3

    def graph_ms(self, fn: Callable[[], object]) -> tuple[float | None, str]:
        """``(ms, "")``: the median time of replaying ``fn`` captured once in a CUDA graph (see
        :func:`capture_cuda_graph`), timed like any call; or ``(None, why)`` off CUDA or when the
        capture fails (e.g. ``fn`` synchronizes with the GPU or reads a value on the host)."""
        if self.device.type != "cuda":
            return None, "CUDA graphs need a CUDA device"
        try:
            graph = capture_cuda_graph(fn, self.device)
        except Exception as error:  # the caller records the reason and keeps the eager time
            _settle(self.device)
            why = first_line(error)
            # Ending a broken capture raises its own error; the first one says what broke it.
            if error.__context__ is not None:
                why = f"{first_line(error.__context__)} (then {why})"
            return None, f"CUDA graph capture failed: {why}"
        try:
            return self._cuda(graph.replay), ""
        finally:
            graph.release()

    def _cuda(self, fn: Callable[[], object]) -> float:
        from triton.testing import do_bench

        with torch.cuda.device(self.device):
            return float(do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))

    def _cpu(self, fn: Callable[[], object]) -> float:
        for _ in range(self.cpu_warmup):
            fn()
        times: list[float] = []
        spent = 0.0
        while len(times) < max(self.cpu_reps, 1):
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            times.append(elapsed)
            spent += elapsed
            if len(times) >= 3 and spent >= self.cpu_budget_s:
                break
        return statistics.median(times) * 1e3


class CapturedGraph:
    """A function captured in a CUDA graph: :meth:`replay` reruns its kernels on the current stream
    with the same input and output buffers. What the function returned during the capture is kept
    alive with the graph (its memory is the graph's); :meth:`release` frees both."""

    def __init__(self, graph: torch.cuda.CUDAGraph, outputs: object) -> None:
        self._graph: torch.cuda.CUDAGraph | None = graph
        self._outputs = outputs

    def replay(self) -> None:
        if self._graph is None:
            raise RuntimeError("this CUDA graph was released")
        self._graph.replay()

    def release(self) -> None:
        self._graph = None
        self._outputs = None


def capture_cuda_graph(
    fn: Callable[[], object], device: torch.device, warmup_calls: int = 3
) -> CapturedGraph:
    """``fn`` captured once in a ``torch.cuda.CUDAGraph`` on ``device``, as the torch docs describe:
    ``warmup_calls`` calls on a side stream first (lazy initialization, autotuning, compiling and
    the autograd engine's own setup happen there, not in the capture), then one call captured.

    ``fn`` must read its inputs from and write its outputs to tensors that stay alive (benchmark
    inputs do), must not synchronize with the GPU, and creates any gradients itself (e.g. with
    ``torch.autograd.grad``, which works inside a capture). Raises whatever the capture raised.
    """
    with torch.cuda.device(device):
        original = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(original)
        with torch.cuda.stream(side):
            for _ in range(warmup_calls):
                fn()
        original.wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                outputs = fn()
        finally:
            # A capture that fails can leave its capture stream current: later work belongs on
            # the stream it ran on before.
            torch.cuda.set_stream(original)
        torch.cuda.synchronize()
    return CapturedGraph(graph, outputs)


def _settle(device: torch.device) -> None:
    """After a failed capture: wait for the GPU, ignoring the capture's own error if it returns."""
    try:
        torch.cuda.synchronize(device)
    except Exception:
        pass


def first_line(error: BaseException) -> str:
    """``"Type: message"`` of ``error``, its first line, at most 300 characters: for a note."""
    text = f"{type(error).__name__}: {error}".strip().splitlines()[0]
    return text if len(text) <= 300 else text[:297] + "..."


def copy_bandwidth_gbps(timer: Timer, nbytes: int | None = None) -> float:
    """Device-to-device copy bandwidth in GB/s (1e9 bytes/s), counting bytes read plus bytes written.

    Copies one buffer of ``nbytes`` into another (default 1 GiB on a GPU, capped at an eighth of the
    free memory; 64 MiB on the CPU). This is the ceiling a bandwidth-bound kernel is compared to:
    TARGETS.md measured 3.0 TB/s on an H100 80GB HBM3.
    """
    device = timer.device
    if nbytes is None:
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            nbytes = min(1 << 30, free // 8)
        else:
            nbytes = 64 << 20
    if nbytes <= 0:
        raise ValueError(f"nbytes must be positive, got {nbytes}")
    source = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(7)
    target = torch.empty_like(source)
    ms = timer(lambda: target.copy_(source))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """``fn`` followed by a wait for the GPU when ``device`` is CUDA (``fn`` itself elsewhere): for
    wall-clock timers such as pytest-benchmark's, which count the launch overhead too."""
    if device.type != "cuda":
        return fn

    def call() -> None:
        fn()
        torch.cuda.synchronize(device)

    return call
