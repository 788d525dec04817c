"""LayerNorm benchmark: providers, shapes, the byte model and result records.

Every provider computes ``y = LayerNorm(x) * weight + bias`` over the last dimension of
``x: [rows, D]`` with eps 1e-6, weight and bias present. Two passes are timed:

- ``fwd``: the forward of a training step (inputs require grad, so what the backward needs is kept);
- ``fwd+bwd``: the forward, then dx, dweight and dbias from ``torch.autograd.grad`` (no gradient
  accumulation into ``.grad``, which would add traffic of its own).

Providers (see :data:`PROVIDERS`): our backends ``triton`` and ``cuda``; torch eager
``F.layer_norm``; ``torch.compile(F.layer_norm)``; Apex ``FusedLayerNorm`` and Liger's LayerNorm
when importable. The ``+autocast`` providers are the mixed-precision comparison of TARGETS.md: an
fp32 residual stream ``x`` with fp32 parameters under ``torch.autocast(dtype)``; torch writes an fp32
``y`` there, ours writes ``y`` in the autocast dtype.

Byte model: the bytes any implementation must move, with ``n = rows * D`` and ``|t|`` the bytes per
element of tensor ``t`` as the provider really reads or writes it::

    fwd:      read x, write y                                         n * (|x| + |y|)
    fwd+bwd:  fwd, then read dy (y's dtype) and x again, write dx     n * (3|x| + 2|y|)
              (dx has x's dtype)

    bf16 throughout:              fwd 4n  (2 * n * 2)   fwd+bwd 10n  (5 * n * 2, as in TARGETS.md)
    fp32 x -> bf16 y (ours, autocast):       fwd 6n     fwd+bwd 16n
    fp32 x -> fp32 y (torch, autocast):      fwd 8n     fwd+bwd 20n

Not counted: weight, bias and their gradients (``O(D)``), the per-row mean and 1/std (8 bytes a row
written and read again, under 0.5% of the total for ``D >= 384``), and any partial sums of dweight
and dbias. GB/s is these bytes over the median time (1 GB = 1e9 bytes); "copy" is that as a
fraction of the device's measured copy bandwidth (also bytes read plus written).

On a GPU, ``host_ms`` is the CPU time to issue one call while the GPU is busy; when it reaches 90%
of ``ms`` the note says "host-bound": the GPU may have waited for launches, so ``ms`` is an upper
bound on the kernels' time (do_bench's L2 flush before each call gives the CPU a head start).

Each provider's outputs are also checked once against a float64 reference on the same inputs, with
``err(t) = max |t - ref| / max |ref|``: ``max_rel_err`` is err(y) for ``fwd`` and the larger of
err(y) and err(dx) for ``fwd+bwd``, whose ``param_rel_err`` is the larger of err(dweight) and
err(dbias). Over the dtype's tolerance (looser for the parameter gradients: they are sums over all
rows, and torch's CPU kernels sum bf16 in bf16) the record says ``"check": "MISMATCH"``.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dinov2_fast import _backend
from dinov2_fast.benchmark import BenchContext, Benchmark, Record, Table, dtype_name
from dinov2_fast.ops.layer_norm import layer_norm

__all__ = [
    "BENCHMARK",
    "EPS",
    "PASSES",
    "PROVIDERS",
    "QUICK_SHAPES",
    "SHAPES",
    "Case",
    "Provider",
    "check_case",
    "make_case",
    "must_move_bytes",
    "parse_shapes",
    "provider_status",
    "run",
]

EPS = 1e-6
PASSES = ("fwd", "fwd+bwd")
# (rows, D): ViT-L (D=1024) and ViT-g (D=1536) multi-crop steps from TARGETS.md, then ViT-S and ViT-B.
SHAPES: tuple[tuple[int, int], ...] = (
    (16448, 1024),
    (16448, 1536),
    (12800, 1024),
    (16448, 384),
    (16448, 768),
)
QUICK_SHAPES: tuple[tuple[int, int], ...] = ((256, 384), (256, 1024))
# Without a GPU the default shapes run with rows divided by this, to finish in seconds.
CPU_ROW_DIVISOR = 16
# The shape and pass whose numbers TARGETS.md sets goals for.
HEADLINE_SHAPE = (16448, 1024)
TARGET_TBPS = 2.4
FLOOR_TBPS = 2.0
TARGET_AUTOCAST_SPEEDUP = 3.0
# TARGETS.md, H100 80GB HBM3, torch 2.11, bf16 16448x1024 fwd+bwd, ms.
REFERENCE_MS = {"torch": 0.158, "torch+autocast": 0.371, "torch.compile": 0.715, "liger": 0.638}
# max |out - ref| / max |ref| allowed for y and dx of each dtype (a few ulps of the largest value),
# and for dweight and dbias (PARAM_TOLERANCE_FACTOR times that).
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}
PARAM_TOLERANCE_FACTOR = 8
NOT_TIMED_NO_GPU = "not timed: no CUDA GPU"

LayerNormFn = Callable[[torch.Tensor], torch.Tensor]
# What a provider's build returns: forward(x) -> y, and the parameter tensors to differentiate.
Built = tuple[LayerNormFn, tuple[torch.Tensor, ...]]


# --- providers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Provider:
    """One implementation to time.

    Attributes:
        name: its name in tables and results.
        description: one line on what it runs.
        build: ``(D, weight, bias) -> (forward, params)``: ``forward(x)`` computes y with those
            parameters (or copies of them), ``params`` are the parameter tensors to differentiate.
        autocast: takes fp32 x and parameters and runs under ``torch.autocast(dtype)``.
        gpu_kernel: a GPU kernel; never timed on the CPU.
        backend: our op's backend, when its availability decides.
        library: import name of an optional library it needs.
        compiles: uses torch.compile (on the CPU only when asked for: compiling is slow there).
    """

    name: str
    description: str
    build: Callable[[int, torch.Tensor, torch.Tensor], Built]
    autocast: bool = False
    gpu_kernel: bool = False
    backend: str | None = None
    library: str | None = None
    compiles: bool = False

    @property
    def baseline(self) -> str:
        """The provider it is compared to: torch eager in the same precision setting."""
        return "torch+autocast" if self.autocast else "torch"


def _torch_eager(dim: int, weight: torch.Tensor, bias: torch.Tensor) -> Built:
    return (lambda x: F.layer_norm(x, (dim,), weight, bias, EPS)), (weight, bias)


def _torch_compiled(dim: int, weight: torch.Tensor, bias: torch.Tensor) -> Built:
    # A fresh compile per shape: no recompile limit to hit, no shapes turned dynamic by a second call.
    torch._dynamo.reset()
    compiled = torch.compile(F.layer_norm, dynamic=False)
    return (lambda x: compiled(x, (dim,), weight, bias, EPS)), (weight, bias)


def _ours(backend: str) -> Callable[[int, torch.Tensor, torch.Tensor], Built]:
    def build(dim: int, weight: torch.Tensor, bias: torch.Tensor) -> Built:
        return (lambda x: layer_norm(x, weight, bias, EPS, backend=backend)), (weight, bias)

    return build


def _apex(dim: int, weight: torch.Tensor, bias: torch.Tensor) -> Built:
    from apex.normalization import FusedLayerNorm

    module = FusedLayerNorm(dim, eps=EPS).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(bias)
    return module, (module.weight, module.bias)


def _liger(dim: int, weight: torch.Tensor, bias: torch.Tensor) -> Built:
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction

    return (lambda x: LigerLayerNormFunction.apply(x, weight, bias, EPS)), (weight, bias)


PROVIDERS: tuple[Provider, ...] = (
    Provider("torch", "torch eager F.layer_norm in the dtype", _torch_eager),
    Provider(
        "torch+autocast",
        "torch eager F.layer_norm, fp32 x under autocast (fp32 out)",
        _torch_eager,
        autocast=True,
    ),
    Provider(
        "torch.compile",
        "torch.compile(F.layer_norm), one compile per shape",
        _torch_compiled,
        compiles=True,
    ),
    Provider(
        "triton",
        "dinov2_fast.ops.layer_norm(backend='triton')",
        _ours("triton"),
        gpu_kernel=True,
        backend="triton",
    ),
    Provider(
        "cuda",
        "dinov2_fast.ops.layer_norm(backend='cuda')",
        _ours("cuda"),
        gpu_kernel=True,
        backend="cuda",
    ),
    Provider(
        "triton+autocast",
        "dinov2_fast.ops.layer_norm(backend='triton'), fp32 x under autocast (autocast dtype out)",
        _ours("triton"),
        autocast=True,
        gpu_kernel=True,
        backend="triton",
    ),
    Provider(
        "cuda+autocast",
        "dinov2_fast.ops.layer_norm(backend='cuda'), fp32 x under autocast (autocast dtype out)",
        _ours("cuda"),
        autocast=True,
        gpu_kernel=True,
        backend="cuda",
    ),
    Provider("apex", "apex.normalization.FusedLayerNorm", _apex, gpu_kernel=True, library="apex"),
    Provider(
        "liger",
        "Liger-Kernel's LigerLayerNormFunction",
        _liger,
        gpu_kernel=True,
        library="liger_kernel",
    ),
)
_BY_NAME = {provider.name: provider for provider in PROVIDERS}


def _library_missing(library: str) -> bool:
    try:
        return importlib.util.find_spec(library) is None
    except (ImportError, ValueError):
        return True


def provider_status(
    provider: Provider, device: torch.device, dtype: torch.dtype, *, compile_on_cpu: bool = False
) -> tuple[str, str]:
    """``("ok", "")`` when ``provider`` can be timed, else ``("skipped" | "not timed", why)``."""
    if provider.autocast and dtype == torch.float32:
        return "skipped", "the autocast comparison needs --dtype bf16 or fp16"
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
    if provider.backend is not None:
        why = _backend.unavailable_reason(provider.backend, device)
        if why:
            return "skipped", why
    return "ok", ""


# --- one case: a provider's inputs at one shape --------------------------------------------------


@dataclass
class Case:
    """A provider ready to run at one shape.

    ``inputs`` are ``(x, *params)``, what the backward differentiates; ``dy`` has y's dtype.
    """

    provider: Provider
    forward: LayerNormFn
    x: torch.Tensor
    inputs: tuple[torch.Tensor, ...]
    dy: torch.Tensor

    def fwd(self) -> torch.Tensor:
        return self.forward(self.x)

    def fwd_bwd(self) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(self.forward(self.x), self.inputs, self.dy)

    @property
    def in_dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def out_dtype(self) -> torch.dtype:
        return self.dy.dtype


def make_case(
    provider: Provider,
    rows: int,
    dim: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
) -> Case:
    """Random inputs for ``provider`` (fp32 for the autocast providers, else ``dtype``), built and
    called once forward (which compiles what needs compiling) to learn y's dtype.

    The same ``seed`` gives every provider the same values before they are cast.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    in_dtype = torch.float32 if provider.autocast else dtype

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=torch.float32)

    x = randn(rows, dim).to(in_dtype).requires_grad_()
    weight = (1 + 0.1 * randn(dim)).to(in_dtype).requires_grad_()
    bias = (0.1 * randn(dim)).to(in_dtype).requires_grad_()
    dy32 = randn(rows, dim)
    inner, params = provider.build(dim, weight, bias)
    forward = inner
    if provider.autocast:

        def forward(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, dtype=dtype):
                return inner(x)

    y = forward(x)
    dy = dy32.to(y.dtype)
    del y, dy32
    return Case(provider, forward, x, (x, *params), dy)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item()
    return (out.double() - ref).abs().max().item() / max(scale, 1e-30)


def check_case(case: Case) -> tuple[float, float, float]:
    """The errors of ``case`` against float64 on its own inputs (see the module docstring):
    ``(err(y), err(dx), max(err(dweight), err(dbias)))``."""
    y = case.fwd()
    dx, *param_grads = case.fwd_bwd()
    ref_inputs = [t.detach().double().requires_grad_() for t in case.inputs]
    ref_x, ref_weight, ref_bias = ref_inputs
    ref_y = F.layer_norm(ref_x, (ref_x.shape[-1],), ref_weight, ref_bias, EPS)
    ref_dx, *ref_param_grads = torch.autograd.grad(ref_y, ref_inputs, case.dy.double())
    param_error = max(_relative_error(g, r) for g, r in zip(param_grads, ref_param_grads))
    return (
        _relative_error(y.detach(), ref_y.detach()),
        _relative_error(dx, ref_dx),
        param_error,
    )


def must_move_bytes(
    pass_: str, rows: int, dim: int, x_dtype: torch.dtype, y_dtype: torch.dtype
) -> int:
    """The byte model of the module docstring: bytes of ``pass_`` ("fwd" or "fwd+bwd")."""
    n = rows * dim
    x_bytes, y_bytes = _itemsize(x_dtype), _itemsize(y_dtype)
    if pass_ == "fwd":
        return n * (x_bytes + y_bytes)
    if pass_ == "fwd+bwd":
        return n * (3 * x_bytes + 2 * y_bytes)
    raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# --- running -------------------------------------------------------------------------------------


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """``"16448x1024,12800x1024"`` -> ``[(16448, 1024), (12800, 1024)]``; ValueError if malformed."""
    shapes: list[tuple[int, ...]] = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
            raise ValueError(
                f"layernorm shapes are ROWSxD, comma-separated (e.g. 16448x1024,12800x1024); "
                f"got {item.strip()!r}"
            )
        rows, dim = (int(part) for part in parts)
        if rows < 1 or dim < 1:
            raise ValueError(f"layernorm shapes need ROWS >= 1 and D >= 1, got {item.strip()!r}")
        shapes.append((rows, dim))
    return shapes


def _record(
    provider: Provider, rows: int, dim: int, pass_: str, status: str, dtype: torch.dtype, **fields
) -> Record:
    record: Record = {
        "benchmark": "layernorm",
        "provider": provider.name,
        "ours": provider.backend is not None,
        "pass": pass_,
        "rows": rows,
        "dim": dim,
        "shape": f"{rows}x{dim}",
        "dtype": dtype_name(dtype),
        "in_dtype": dtype_name(torch.float32 if provider.autocast else dtype),
        "out_dtype": None,
        "status": status,
        "ms": None,
        "bytes": None,
        "GBps": None,
        "copy_fraction": None,
        "baseline": provider.baseline,
        "speedup": None,
        "max_rel_err": None,
        "param_rel_err": None,
        "check": None,
        "host_ms": None,
        "note": "",
    }
    record.update(fields)
    return record


def _first_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()[0]
    return text if len(text) <= 300 else text[:297] + "..."


def _measure(context: BenchContext, provider: Provider, rows: int, dim: int) -> list[Record]:
    """Both passes of one provider at one shape; an exception becomes an "error" record for each
    pass not yet measured."""
    records: list[Record] = []
    try:
        case = make_case(provider, rows, dim, device=context.device, dtype=context.dtype)
        y_error, dx_error, param_error = check_case(case)
        tolerance = max(TOLERANCE.get(case.in_dtype, 0.0), TOLERANCE.get(case.out_dtype, 0.0))
        for pass_, fn, error, param_error_or_none in (
            ("fwd", case.fwd, y_error, None),
            ("fwd+bwd", case.fwd_bwd, max(y_error, dx_error), param_error),
        ):
            good = _within(error, tolerance) and (
                param_error_or_none is None
                or _within(param_error_or_none, PARAM_TOLERANCE_FACTOR * tolerance)
            )
            context.say(f"layernorm {rows}x{dim} {pass_:<7} {provider.name}")
            ms = context.timer(fn)
            host_ms = context.timer.host_ms(fn)
            # Within 10% of the event time: the GPU may have waited for launches.
            host_bound = host_ms is not None and host_ms >= 0.9 * ms
            nbytes = must_move_bytes(pass_, rows, dim, case.in_dtype, case.out_dtype)
            gbps = nbytes / (ms * 1e-3) / 1e9
            records.append(
                _record(
                    provider,
                    rows,
                    dim,
                    pass_,
                    "ok",
                    context.dtype,
                    in_dtype=dtype_name(case.in_dtype),
                    out_dtype=dtype_name(case.out_dtype),
                    ms=ms,
                    bytes=nbytes,
                    GBps=gbps,
                    copy_fraction=gbps / context.copy_gbps if context.copy_gbps > 0 else None,
                    max_rel_err=error,
                    param_rel_err=param_error_or_none,
                    check="ok" if good else "MISMATCH",
                    host_ms=host_ms,
                    note=f"host-bound: {host_ms:.3f} ms to launch" if host_bound else "",
                )
            )
    except Exception as error:  # one broken provider must not stop the others
        note = _first_line(error)
        records += [
            _record(provider, rows, dim, pass_, "error", context.dtype, note=note)
            for pass_ in PASSES[len(records) :]
        ]
    if context.device.type == "cuda":
        try:
            torch.cuda.synchronize(context.device)
            torch.cuda.empty_cache()
        except Exception:  # a broken CUDA context: the next provider will record its own error
            pass
    return records


def _within(error: float, tolerance: float) -> bool:
    return math.isfinite(error) and error <= tolerance


def _add_speedups(records: list[Record]) -> None:
    times = {
        (r["shape"], r["pass"], r["provider"]): r["ms"] for r in records if r["status"] == "ok"
    }
    for record in records:
        baseline_ms = times.get((record["shape"], record["pass"], record["baseline"]))
        if record["status"] == "ok" and baseline_ms:
            record["speedup"] = baseline_ms / record["ms"]


def run(
    context: BenchContext, shapes: Sequence[tuple[int, ...]] | None = None
) -> tuple[list[Record], list[str]]:
    """Time every provider at every shape, both passes. Returns (records, notes)."""
    notes: list[str] = []
    on_gpu = context.device.type == "cuda"
    if shapes is None:
        if context.quick:
            shapes = QUICK_SHAPES
            notes.append(
                "--quick: small shapes and few repetitions; the numbers are not meaningful"
            )
        elif on_gpu:
            shapes = SHAPES
        else:
            shapes = tuple((max(rows // CPU_ROW_DIVISOR, 1), dim) for rows, dim in SHAPES)
            notes.append(
                f"no GPU: the default shapes were scaled down to rows/{CPU_ROW_DIVISOR} for the CPU"
            )
    if not on_gpu:
        notes.append(
            "GPU kernels (triton, cuda, apex, liger) were not timed: no CUDA GPU. The CPU times of "
            "the torch paths only show that the benchmark runs."
        )
    records: list[Record] = []
    for rows, dim in shapes:
        shape_records: list[Record] = []
        for provider in PROVIDERS:
            status, why = provider_status(
                provider, context.device, context.dtype, compile_on_cpu=context.compile_on_cpu
            )
            if status != "ok":
                shape_records += [
                    _record(provider, rows, dim, pass_, status, context.dtype, note=why)
                    for pass_ in PASSES
                ]
                continue
            shape_records += _measure(context, provider, rows, dim)
        _add_speedups(shape_records)
        records += shape_records
    return records, notes


# --- tables --------------------------------------------------------------------------------------


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _dtypes(record: Record) -> str:
    if record["out_dtype"] is None:
        return record["in_dtype"]
    if record["out_dtype"] == record["in_dtype"]:
        return record["in_dtype"]
    return f"{record['in_dtype']}->{record['out_dtype']}"


def table(records: Sequence[Record]) -> Table:
    """One row per timed provider x shape x pass; skipped providers are listed under the table."""
    result = Table(
        "LayerNorm (median ms; GB/s of must-move bytes; copy = fraction of the copy bandwidth)",
        ["shape", "pass", "provider", "dtypes", "ms", "GB/s", "copy", "vs base", "err", "note"],
    )
    left_out: dict[tuple[str, str], list[str]] = {}
    shapes = list(dict.fromkeys(record["shape"] for record in records))
    # Grouped by shape, then pass; providers in the order they ran.
    ordered = sorted(records, key=lambda r: (shapes.index(r["shape"]), PASSES.index(r["pass"])))
    for record in ordered:
        if record["status"] in ("ok", "error"):
            speedup = record["speedup"]
            result.rows.append(
                [
                    record["shape"],
                    record["pass"],
                    record["provider"],
                    _dtypes(record),
                    _number(record["ms"], 4),
                    _number(record["GBps"], 0),
                    "-"
                    if record["copy_fraction"] is None
                    else f"{100 * record['copy_fraction']:.0f}%",
                    "-" if speedup is None else f"{speedup:.2f}x",
                    "-" if record["max_rel_err"] is None else f"{record['max_rel_err']:.1e}",
                    "MISMATCH" if record["check"] == "MISMATCH" else record["note"],
                ]
            )
        else:
            providers = left_out.setdefault((record["status"], record["note"]), [])
            if record["provider"] not in providers:
                providers.append(record["provider"])
    for (status, why), providers in left_out.items():
        prefix = "" if why.startswith(status) else f"{status}: "
        result.notes.append(f"{', '.join(providers)}: {prefix}{why}")
    result.notes.append(
        "vs base: the torch eager time over this one (torch+autocast for the +autocast rows); "
        "err: max |out - float64 ref| / max |ref|"
    )
    return result


def headline(records: Sequence[Record]) -> Table | None:
    """The bf16 16448x1024 forward+backward numbers against TARGETS.md, or None if not measured."""
    rows, dim = HEADLINE_SHAPE
    chosen = [
        r
        for r in records
        if r["rows"] == rows
        and r["dim"] == dim
        and r["pass"] == "fwd+bwd"
        and r["dtype"] == "bf16"
        and r["status"] == "ok"
    ]
    if not chosen:
        return None
    result = Table(
        f"LayerNorm bf16 {rows}x{dim} forward+backward against TARGETS.md",
        ["provider", "dtypes", "ms", "TB/s", "copy", "vs base", "target", "verdict"],
    )
    for record in chosen:
        tbps = record["GBps"] / 1e3
        target = verdict = ""
        ours = _BY_NAME.get(record["provider"], None)
        if ours is not None and ours.backend is not None:
            if ours.autocast:
                target = f">= {TARGET_AUTOCAST_SPEEDUP:.0f}x torch+autocast"
                met = (record["speedup"] or 0.0) >= TARGET_AUTOCAST_SPEEDUP
                verdict = "met" if met else "below target"
            else:
                target = f">= {TARGET_TBPS} TB/s (floor {FLOOR_TBPS})"
                verdict = (
                    "goal met"
                    if tbps >= TARGET_TBPS
                    else "floor met"
                    if tbps >= FLOOR_TBPS
                    else "below floor"
                )
        if record["check"] == "MISMATCH":
            verdict = "MISMATCH: wrong results"
        result.rows.append(
            [
                record["provider"],
                _dtypes(record),
                _number(record["ms"], 4),
                f"{tbps:.2f}",
                "-" if record["copy_fraction"] is None else f"{100 * record['copy_fraction']:.0f}%",
                "-" if record["speedup"] is None else f"{record['speedup']:.2f}x",
                target,
                verdict,
            ]
        )
    result.notes.append(
        "TARGETS.md on an H100 (ms): "
        + ", ".join(f"{name} {ms}" for name, ms in REFERENCE_MS.items())
        + "; the targets are set for an H100 80GB HBM3"
    )
    return result


BENCHMARK = Benchmark(
    name="layernorm",
    summary="LayerNorm forward and forward+backward: ours vs torch eager, autocast, compile, Apex, "
    "Liger",
    shapes_help="ROWSxD,... (e.g. 16448x1024,12800x1024)",
    parse_shapes=parse_shapes,
    run=run,
    table=table,
    headline=headline,
)
