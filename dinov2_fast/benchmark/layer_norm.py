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

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dinov2_fast.benchmark import BenchContext, Benchmark, Record, Table, common, dtype_name
from dinov2_fast.benchmark.common import PASSES
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


def provider_status(
    provider: Provider,
    device: torch.device,
    dtype: torch.dtype,
    shape: tuple[int, int] | None = None,
    *,
    compile_on_cpu: bool = False,
) -> tuple[str, str]:
    """``("ok", "")`` when ``provider`` can be timed (at any shape), else
    ``("skipped" | "not timed", why)``."""
    if provider.autocast and dtype == torch.float32:
        return "skipped", "the autocast comparison needs --dtype bf16 or fp16"
    return common.availability(provider, device, compile_on_cpu=compile_on_cpu)


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


def check_case(case: Case) -> tuple[float, float, float]:
    """The errors of ``case`` against float64 on its own inputs (see the module docstring):
    ``(err(y), err(dx), max(err(dweight), err(dbias)))``."""
    y = case.fwd()
    dx, *param_grads = case.fwd_bwd()
    ref_inputs = [t.detach().double().requires_grad_() for t in case.inputs]
    ref_x, ref_weight, ref_bias = ref_inputs
    ref_y = F.layer_norm(ref_x, (ref_x.shape[-1],), ref_weight, ref_bias, EPS)
    ref_dx, *ref_param_grads = torch.autograd.grad(ref_y, ref_inputs, case.dy.double())
    param_error = max(common.relative_error(g, r) for g, r in zip(param_grads, ref_param_grads))
    return (
        common.relative_error(y.detach(), ref_y.detach()),
        common.relative_error(dx, ref_dx),
        param_error,
    )


def must_move_bytes(
    pass_: str, rows: int, dim: int, x_dtype: torch.dtype, y_dtype: torch.dtype
) -> int:
    """The byte model of the module docstring: bytes of ``pass_`` ("fwd" or "fwd+bwd")."""
    n = rows * dim
    x_bytes, y_bytes = common.itemsize(x_dtype), common.itemsize(y_dtype)
    if pass_ == "fwd":
        return n * (x_bytes + y_bytes)
    if pass_ == "fwd+bwd":
        return n * (3 * x_bytes + 2 * y_bytes)
    raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")


# --- running -------------------------------------------------------------------------------------


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """``"16448x1024,12800x1024"`` -> ``[(16448, 1024), (12800, 1024)]``; ValueError if malformed."""
    return [
        common.parse_dims(item, "layernorm", ("ROWS", "D"), "ROWSxD", "16448x1024,12800x1024")
        for item in common.split_shapes(text)
    ]


def _record(
    provider: Provider,
    shape: tuple[int, int],
    pass_: str,
    status: str,
    dtype: torch.dtype,
    **fields,
) -> Record:
    rows, dim = shape
    defaults = {
        "rows": rows,
        "dim": dim,
        "in_dtype": dtype_name(torch.float32 if provider.autocast else dtype),
        "out_dtype": None,
        "bytes": None,
        "GBps": None,
        "copy_fraction": None,
        "baseline": provider.baseline,
        "param_rel_err": None,
    }
    shape_name = f"{rows}x{dim}"
    return common.new_record(
        "layernorm", provider, pass_, shape_name, status, dtype, {**defaults, **fields}
    )


def _measure(context: BenchContext, provider: Provider, shape: tuple[int, int]) -> list[Record]:
    """Both passes of one provider at one shape (see ``common.measure_passes``)."""
    rows, dim = shape

    def body() -> Iterator[Record]:  # run by measure_passes: make_case's errors are caught there
        case = make_case(provider, rows, dim, device=context.device, dtype=context.dtype)
        y_error, dx_error, param_error = check_case(case)
        tolerance = max(TOLERANCE.get(case.in_dtype, 0.0), TOLERANCE.get(case.out_dtype, 0.0))
        for pass_, fn, error, param_error_or_none in (
            ("fwd", case.fwd, y_error, None),
            ("fwd+bwd", case.fwd_bwd, max(y_error, dx_error), param_error),
        ):
            good = common.within(error, tolerance) and (
                param_error_or_none is None
                or common.within(param_error_or_none, PARAM_TOLERANCE_FACTOR * tolerance)
            )
            context.say(f"layernorm {rows}x{dim} {pass_:<7} {provider.name}")
            ms, host_ms, note = common.time_call(context, fn)
            nbytes = must_move_bytes(pass_, rows, dim, case.in_dtype, case.out_dtype)
            gbps = nbytes / (ms * 1e-3) / 1e9
            yield _record(
                provider,
                shape,
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
                note=note,
            )

    return common.measure_passes(context, provider, shape, body(), _record)


def run(
    context: BenchContext, shapes: Sequence[tuple[int, ...]] | None = None
) -> tuple[list[Record], list[str]]:
    """Time every provider at every shape, both passes. Returns (records, notes)."""
    shapes, notes = common.choose_shapes(
        context,
        shapes,
        full=SHAPES,
        quick=QUICK_SHAPES,
        cpu=tuple((max(rows // CPU_ROW_DIVISOR, 1), dim) for rows, dim in SHAPES),
        cpu_scaling=f"rows/{CPU_ROW_DIVISOR}",
        gpu_kernels=[
            provider.name
            for provider in PROVIDERS
            if provider.gpu_kernel and "+" not in provider.name
        ],
    )
    records = common.run_providers(
        context, shapes, PROVIDERS, status=provider_status, measure=_measure, record=_record
    )
    return records, notes


# --- tables --------------------------------------------------------------------------------------


def _dtypes(record: Record) -> str:
    if record["out_dtype"] is None:
        return record["in_dtype"]
    if record["out_dtype"] == record["in_dtype"]:
        return record["in_dtype"]
    return f"{record['in_dtype']}->{record['out_dtype']}"


def _cells(record: Record) -> list[str]:
    return [
        record["shape"],
        record["pass"],
        record["provider"],
        _dtypes(record),
        common.number(record["ms"], 4),
        common.number(record["GBps"], 0),
        common.percent(record["copy_fraction"]),
        common.speedup(record["speedup"]),
        common.error(record["max_rel_err"]),
        "MISMATCH" if record["check"] == "MISMATCH" else record["note"],
    ]


def table(records: Sequence[Record]) -> Table:
    """One row per timed provider x shape x pass; skipped providers are listed under the table."""
    result = common.provider_table(
        "LayerNorm (median ms; GB/s of must-move bytes; copy = fraction of the copy bandwidth)",
        ["shape", "pass", "provider", "dtypes", "ms", "GB/s", "copy", "vs base", "err", "note"],
        records,
        _cells,
    )
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
                verdict = common.verdict(tbps, TARGET_TBPS, FLOOR_TBPS, higher_is_better=True)
        if record["check"] == "MISMATCH":
            verdict = "MISMATCH: wrong results"
        result.rows.append(
            [
                record["provider"],
                _dtypes(record),
                common.number(record["ms"], 4),
                f"{tbps:.2f}",
                common.percent(record["copy_fraction"]),
                common.speedup(record["speedup"]),
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
