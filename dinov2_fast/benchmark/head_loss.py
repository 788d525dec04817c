"""Head-loss benchmark: the DINO / iBOT heads and their cross-entropy, time and peak memory.

One step is what a DINOv2 training step does after the backbones, on ``R`` rows (the CLS tokens of
every crop and the masked patch tokens: 2816 rows in a 32-image ViT-L step, TARGETS.md): the
teacher head on the teacher's rows under ``torch.no_grad``, its targets (softmax centering, or
Sinkhorn-Knopp for the ``-sinkhorn`` providers), the student head, the soft-target cross-entropy
averaged over the rows, and the gradients of the student's rows and of every student head parameter
(``torch.autograd.grad``: nothing accumulates in ``.grad``). The heads are DINOv2's
(:class:`dinov2_fast.models.DINOHead`: MLP ``in → hidden → hidden → F``, GELU, L2 normalisation, a
weight-normed last layer to ``K`` prototypes), fp32 parameters, the forward under
``torch.autocast(--dtype)`` (none for fp32). Student and teacher heads are two seeded
initialisations; the rows are fp32 (a backbone's LayerNorm output under autocast), the center a
small random ``[K]``. Temperatures: student 0.1, teacher 0.07 (DINOv2's).

Providers (see :data:`PROVIDERS`):

- ``torch``: plain PyTorch as DINOv2 does it (the baseline of TARGETS.md): each head to its logits
  ``[R, K]``, ``DINOLoss.softmax_center_teacher`` (fp32 softmax of the centered logits) and the
  teacher logits' mean for the center update, then ``DINOLoss`` (``log_softmax`` of the student
  logits, fp32, the mean over rows), backward;
- ``fused``: the head MLPs and normalisation in PyTorch, then ``prototype_cross_entropy(
  backend="triton")`` with both last layers' weights (``last_layer.weight``, cast to the autocast
  dtype as autocast's ``F.linear`` would): the logits ``[R, K]`` never exist in memory;
- ``torch-sinkhorn`` and ``fused-sinkhorn``: the same with DINOv2's Sinkhorn-Knopp targets (3
  iterations) instead of centering;
- ``torch.compile``: the ``torch`` step's forward under ``torch.compile(dynamic=False)``, one
  compile per shape, its time reported apart (``first_call_s``), not in ``ms``.

Reported per provider and shape: ``ms`` (median ``do_bench`` of eager steps), ``graph_ms`` (the
step captured once in a CUDA graph and replayed; CUDA only, the note says why when the capture
fails), ``peak_GiB`` (the most memory allocated during one step beyond what was allocated before it:
inputs, weights and center excluded; the step's gradients counted; CUDA only), and against the
baseline (``torch``, or ``torch-sinkhorn`` for the Sinkhorn rows) at the same shape:
``memory_ratio`` (peak over the baseline's) and ``speedup`` (the baseline's ms over this one).

Correctness: each provider's loss, its gradients and (centering) the teacher logits' mean are
compared with its baseline's on the same inputs: ``max_rel_err`` is ``|loss - ref| / |ref|``,
``grad_rel_err`` the largest ``max |g - g_ref| / max |g_ref|`` over the gradients of the student
head's parameters and the mean (not the rows' gradient: see ``_Outputs``). Over
:data:`LOSS_TOLERANCE` or :data:`GRAD_TOLERANCE` the record says ``"check": "MISMATCH"``, and a
mismatch or an error of ours makes ``dinov2-fast bench`` exit 1. The baselines' own records carry no
error (they are the reference).

Without a GPU the fused providers run the op's torch backend (the Triton interpreter would take
minutes at these sizes): the CPU run checks the plumbing, its numbers are not meaningful.

The targets (TARGETS.md, "DINO / iBOT heads and loss", H100): at ``R = 2816`` and ``K`` = 65536 and
131072, the fused step's peak extra memory at most 10% of plain PyTorch's (0.33 and 0.65 GiB of
TARGETS.md's 3.27 and 6.47), at no more than plain PyTorch's time (9.37 and 18.13 ms).
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dinov2_fast.benchmark import BenchContext, Benchmark, Record, Table, common
from dinov2_fast.models.dino_head import DINOHead
from dinov2_fast.train.losses import DINOLoss

__all__ = [
    "BENCHMARK",
    "CPU_SHAPES",
    "GRAD_TOLERANCE",
    "LOSS_TOLERANCE",
    "PROVIDERS",
    "QUICK_SHAPES",
    "REFERENCE",
    "ROWS",
    "SHAPES",
    "Case",
    "Inputs",
    "Provider",
    "Shape",
    "make_case",
    "op_backend",
    "parse_shapes",
    "provider_status",
    "run",
]

# Rows of a 32-image ViT-L step (TARGETS.md): the CLS tokens of all crops and the masked patches.
ROWS = 2816
STUDENT_TEMP = 0.1
TEACHER_TEMP = 0.07
SINKHORN_ITERS = 3
# TARGETS.md, H100 80GB HBM3: plain PyTorch's (ms, peak extra GiB) per K, and the fused op's goals.
REFERENCE: dict[int, tuple[float, float]] = {65536: (9.37, 3.27), 131072: (18.13, 6.47)}
TARGET_MEMORY_FRACTION = 0.10
# |loss - ref| / |ref| and max |g - g_ref| / max |g_ref| allowed against the baseline, per dtype
# (fp32: Triton's dots run in TF32, about fp16's precision).
LOSS_TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 5e-3}
GRAD_TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 2e-2, torch.float32: 2e-2}
# A torch.compile is not started with less time than this left before --time-limit's deadline.
COMPILE_RESERVE_S = 30.0
OUT_OF_TIME_COMPILE = f"out of time (--time-limit): a compile needs ~{COMPILE_RESERVE_S:.0f} s"
OP_MODULE = "dinov2_fast.ops.prototype_cross_entropy"


# --- shapes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """``rows`` rows through heads ``in_dim → hidden → hidden → bottleneck → prototypes``."""

    rows: int
    prototypes: int
    bottleneck: int = 256
    hidden: int = 2048
    in_dim: int = 1024

    @property
    def name(self) -> str:
        return f"{self.rows}x{self.prototypes}x{self.bottleneck}"

    @property
    def head(self) -> str:
        """The head's widths, e.g. "1024-2048-2048-256-65536"."""
        widths = (self.in_dim, self.hidden, self.hidden, self.bottleneck, self.prototypes)
        return "-".join(map(str, widths))

    @property
    def default_mlp(self) -> bool:
        return (self.in_dim, self.hidden) == (1024, 2048)


SHAPES: tuple[Shape, ...] = (Shape(ROWS, 65536), Shape(ROWS, 131072))
QUICK_SHAPES: tuple[Shape, ...] = (
    Shape(64, 1024, 64, hidden=128, in_dim=128),
    Shape(64, 2048, 64, hidden=128, in_dim=128),
)
# Without a GPU: rows and K divided by 16, the MLP a quarter as wide.
CPU_SHAPES: tuple[Shape, ...] = (
    Shape(ROWS // 16, 65536 // 16, 256, hidden=512, in_dim=256),
    Shape(ROWS // 16, 131072 // 16, 256, hidden=512, in_dim=256),
)


def parse_shapes(text: str) -> list[Shape]:
    """``"65536,2816x131072x256"`` -> ``[Shape(2816, 65536), Shape(2816, 131072, 256)]``: each item
    ``K`` (2816 rows, F = 256) or ``ROWSxKxF``, with DINOv2's MLP 1024 → 2048 → 2048 → F;
    ValueError if malformed."""
    shapes = []
    for item in common.split_shapes(text):
        if item.isdigit():
            (prototypes,) = common.parse_dims(item, "head-loss", ("K",), "K", "65536")
            shapes.append(Shape(ROWS, prototypes))
            continue
        rows, prototypes, bottleneck = common.parse_dims(
            item,
            "head-loss",
            ("ROWS", "K", "F"),
            "K or ROWSxKxF",
            "65536,2816x131072x256",
        )
        shapes.append(Shape(rows, prototypes, bottleneck))
    return shapes


# --- providers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Provider:
    """One implementation to time.

    Attributes:
        name: its name in tables and results.
        description: one line on what it runs.
        fused: the heads' MLPs, then our ``prototype_cross_entropy`` (else the plain torch step).
        sinkhorn: Sinkhorn-Knopp teacher targets (else softmax centering).
        backend: the op's backend on a GPU (our op's providers only); the CPU runs "torch".
        compiles: uses torch.compile (on the CPU only when asked for: compiling is slow there).
    """

    name: str
    description: str
    fused: bool = False
    sinkhorn: bool = False
    backend: str | None = None
    compiles: bool = False
    gpu_kernel: bool = False
    library: str | None = None

    @property
    def teacher(self) -> str:
        return "sinkhorn" if self.sinkhorn else "centering"

    @property
    def baseline(self) -> str:
        return "torch-sinkhorn" if self.sinkhorn else "torch"


PROVIDERS: tuple[Provider, ...] = (
    Provider("torch", "plain PyTorch: logits [R, K], DINOLoss centering and cross-entropy"),
    Provider(
        "fused",
        "head MLPs in PyTorch, then prototype_cross_entropy(backend='triton')",
        fused=True,
        backend="triton",
        gpu_kernel=True,
    ),
    Provider(
        "torch-sinkhorn",
        f"plain PyTorch with DINOLoss's Sinkhorn-Knopp targets ({SINKHORN_ITERS} iterations)",
        sinkhorn=True,
    ),
    Provider(
        "fused-sinkhorn",
        f"prototype_cross_entropy(sinkhorn_iters={SINKHORN_ITERS}, backend='triton')",
        fused=True,
        sinkhorn=True,
        backend="triton",
        gpu_kernel=True,
    ),
    Provider(
        "torch.compile",
        "torch.compile(dynamic=False) of the torch step's forward, one compile per shape",
        compiles=True,
    ),
)
_ORDER = {provider.name: i for i, provider in enumerate(PROVIDERS)}


def _op() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``dinov2_fast.ops.prototype_cross_entropy``; ImportError when this version has none."""
    return importlib.import_module(OP_MODULE).prototype_cross_entropy


def _op_missing() -> str:
    try:
        _op()
    except (ImportError, AttributeError) as error:
        return f"{OP_MODULE} is not available ({common.first_line(error)})"
    return ""


def op_backend(provider: Provider, device: torch.device) -> str | None:
    """The op backend ``provider`` runs on ``device``: its own on a GPU, "torch" elsewhere."""
    if not provider.fused:
        return None
    return provider.backend if device.type == "cuda" else "torch"


def provider_status(
    provider: Provider,
    device: torch.device,
    dtype: torch.dtype,
    shape: Shape | None = None,
    *,
    compile_on_cpu: bool = False,
) -> tuple[str, str]:
    """``("ok", "")`` when ``provider`` can be timed, else ``("skipped" | "not timed", why)``. On
    the CPU the fused providers run the op's torch backend."""
    if provider.fused:
        why = _op_missing()
        if why:
            return "skipped", why
        if device.type != "cuda":
            return "ok", ""
        max_width = importlib.import_module(OP_MODULE).MAX_WIDTH
        if shape is not None and shape.bottleneck > max_width:
            return "skipped", f"the op's kernels take F <= {max_width}, got {shape.bottleneck}"
    return common.availability(provider, device, compile_on_cpu=compile_on_cpu)


# --- inputs and one provider's step --------------------------------------------------------------


class Inputs:
    """What every provider of one shape shares, built on ``device`` once: the student and teacher
    heads (seeded), the student's rows ``x [R, in_dim]`` (requires grad), the teacher's rows, the
    center ``[K]`` and the row weights ``[R]`` (1/R: DINOLoss's mean over rows)."""

    def __init__(self, shape: Shape, device: torch.device, seed: int = 0) -> None:
        self.shape = shape
        self.device = device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.device(device):
            torch.manual_seed(seed)

            def head() -> DINOHead:
                return DINOHead(
                    shape.in_dim,
                    shape.prototypes,
                    hidden_dim=shape.hidden,
                    bottleneck_dim=shape.bottleneck,
                )

            self.student = head()
            self.teacher = head().requires_grad_(False)
            self.x = torch.randn(shape.rows, shape.in_dim).requires_grad_()
            self.x_teacher = torch.randn(shape.rows, shape.in_dim)
            self.center = 0.01 * torch.randn(shape.prototypes)
            self.row_weight = torch.full((shape.rows,), 1.0 / shape.rows)

    @property
    def leaves(self) -> list[torch.Tensor]:
        """What the backward differentiates: the student's rows, then its head's parameters."""
        return [self.x, *self.student.parameters()]


def _autocast(device: torch.device, dtype: torch.dtype):
    """``torch.autocast(dtype)`` for the half dtypes; nothing for fp32 (and fp64)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _features(head: DINOHead, x: torch.Tensor) -> torch.Tensor:
    """``DINOHead.forward`` up to the last layer: the MLP, then L2 normalisation (DINOv2's eps)."""
    z = head.mlp(x)
    return F.normalize(z, dim=-1, p=2, eps=1e-6 if z.dtype == torch.float16 else 1e-12)


# forward() -> (loss, the teacher logits' mean [K] or None)
Forward = Callable[[], tuple[torch.Tensor, torch.Tensor | None]]


def _torch_forward(inputs: Inputs, provider: Provider, dtype: torch.dtype) -> Forward:
    """DINOv2's order: the teacher's logits and targets first (and the mean that updates the
    center), then the student's logits and the loss."""
    loss_module = DINOLoss(inputs.shape.prototypes, student_temp=STUDENT_TEMP).to(inputs.device)
    loss_module.center.copy_(inputs.center.view(1, -1))
    device = inputs.device

    def forward() -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.no_grad(), _autocast(device, dtype):
            teacher_logits = inputs.teacher(inputs.x_teacher)
        mean = None
        if provider.sinkhorn:
            targets = loss_module.sinkhorn_knopp_teacher(
                teacher_logits, TEACHER_TEMP, SINKHORN_ITERS
            )
        else:
            targets = loss_module.softmax_center_teacher(teacher_logits, TEACHER_TEMP)
            mean = teacher_logits.mean(0, dtype=torch.float32)  # for the center's update
        del teacher_logits
        with _autocast(device, dtype):
            student_logits = inputs.student(inputs.x)
        return loss_module([student_logits], [targets]), mean

    return forward


def _fused_forward(inputs: Inputs, provider: Provider, dtype: torch.dtype) -> Forward:
    op = _op()
    backend = op_backend(provider, inputs.device)
    device = inputs.device

    def forward() -> tuple[torch.Tensor, torch.Tensor | None]:
        with _autocast(device, dtype):
            with torch.no_grad():
                teacher_feats = _features(inputs.teacher, inputs.x_teacher)
                teacher_weight = inputs.teacher.last_layer.weight
            student_feats = _features(inputs.student, inputs.x)
            student_weight = inputs.student.last_layer.weight
        # What autocast's F.linear would multiply: both operands in the autocast dtype.
        loss, mean = op(
            student_feats.to(dtype),
            student_weight.to(dtype),
            teacher_feats.to(dtype),
            teacher_weight.to(dtype),
            student_temp=STUDENT_TEMP,
            teacher_temp=TEACHER_TEMP,
            center=None if provider.sinkhorn else inputs.center,
            sinkhorn_iters=SINKHORN_ITERS if provider.sinkhorn else 0,
            row_weight=inputs.row_weight,
            backend=backend,
        )
        return loss, None if provider.sinkhorn else mean

    return forward


@dataclass
class Case:
    """One provider ready to run on one shape's :class:`Inputs`. ``step()`` is the timed work: the
    forward, then the gradients of ``inputs.leaves``; it returns ``(loss, mean, *grads)``."""

    provider: Provider
    inputs: Inputs
    forward: Forward

    def step(self) -> tuple[torch.Tensor | None, ...]:
        loss, mean = self.forward()
        grads = torch.autograd.grad(loss, self.inputs.leaves)
        return (loss.detach(), mean, *grads)


def make_case(provider: Provider, inputs: Inputs, dtype: torch.dtype) -> Case:
    """``provider``'s step on ``inputs`` under autocast ``dtype`` (not called yet)."""
    if provider.fused:
        forward = _fused_forward(inputs, provider, dtype)
    else:
        forward = _torch_forward(inputs, provider, dtype)
        if provider.compiles:
            # A fresh compile per shape: no recompile limit to hit, no shapes turned dynamic.
            torch._dynamo.reset()
            forward = torch.compile(forward, dynamic=False)
    return Case(provider, inputs, forward)


# --- the check against the baseline --------------------------------------------------------------


@dataclass
class _Outputs:
    """What one step's check compares, on the host in float64: the loss, the teacher logits' mean
    (or None) and the gradients of the student head's parameters.

    The gradient of the rows ``x`` is left out: after three bf16 layers and the normalisation's
    projection it is off by several percent of its largest value against a float64 step in both
    the torch and the fused step, more as K grows; the parameters' gradients, sums over the rows,
    stay within about 1%."""

    loss: float
    mean: torch.Tensor | None
    grads: list[torch.Tensor]

    @classmethod
    def of(cls, result: tuple[torch.Tensor | None, ...]) -> _Outputs:
        loss, mean, _x_grad, *param_grads = result
        assert loss is not None
        host = [g.detach().to("cpu", torch.float64) for g in param_grads if g is not None]
        return cls(
            float(loss),
            None if mean is None else mean.detach().to("cpu", torch.float64),
            host,
        )

    def errors(self, reference: _Outputs) -> tuple[float, float]:
        """``(loss error, largest gradient or mean error)`` against ``reference``."""
        loss_error = abs(self.loss - reference.loss) / max(abs(reference.loss), 1e-30)
        pairs = list(zip(self.grads, reference.grads))
        if self.mean is not None and reference.mean is not None:
            pairs.append((self.mean, reference.mean))
        grad_error = max((common.relative_error(out, ref) for out, ref in pairs), default=0.0)
        return loss_error, grad_error


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- running -------------------------------------------------------------------------------------


def _record(
    provider: Provider, shape: Shape, pass_: str, status: str, dtype: torch.dtype, **fields
) -> Record:
    defaults = {
        "rows": shape.rows,
        "prototypes": shape.prototypes,
        "bottleneck": shape.bottleneck,
        "hidden": shape.hidden,
        "in_dim": shape.in_dim,
        "head": shape.head,
        "teacher": provider.teacher,
        "backend": None,
        "graph_ms": None,
        "peak_GiB": None,
        "memory_ratio": None,
        "first_call_s": None,
        "loss": None,
        "grad_rel_err": None,
        "baseline": provider.baseline,
    }
    return common.new_record(
        "head-loss", provider, pass_, shape.name, status, dtype, {**defaults, **fields}
    )


class _Run:
    """One run's state: the inputs of the shape being measured (one shape's at a time) and the
    baselines' outputs per shape and teacher, which the other providers are checked against."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._inputs: Inputs | None = None
        self.references: dict[tuple[Shape, str], _Outputs] = {}

    def inputs(self, shape: Shape) -> Inputs:
        if self._inputs is None or self._inputs.shape != shape:
            self._inputs = None  # free the last shape's before building the next
            self._inputs = Inputs(shape, self.device)
        return self._inputs


def _measure(context: BenchContext, provider: Provider, shape: Shape, state: _Run) -> list[Record]:
    """One provider at one shape (see ``common.measure_passes``)."""
    dtype = context.dtype

    def body() -> Iterator[Record]:  # run by measure_passes: errors are caught there
        if provider.compiles:
            left = context.seconds_left()
            if left is not None and left < COMPILE_RESERVE_S:
                yield _record(
                    provider, shape, "fwd+bwd", "skipped", dtype, note=OUT_OF_TIME_COMPILE
                )
                return
        inputs = state.inputs(shape)
        case = make_case(provider, inputs, dtype)
        context.say(f"head-loss {shape.name} {provider.name}")
        start = time.perf_counter()
        outputs = _Outputs.of(case.step())  # compiles and autotunes what needs it
        _synchronize(context.device)
        first_call_s = time.perf_counter() - start
        key = (shape, provider.teacher)
        loss_error = grad_error = None
        check = None
        notes = []
        if provider.name == provider.baseline:
            state.references[key] = outputs
        elif key in state.references:
            loss_error, grad_error = outputs.errors(state.references[key])
            good = common.within(loss_error, LOSS_TOLERANCE.get(dtype, 0.0)) and common.within(
                grad_error, GRAD_TOLERANCE.get(dtype, 0.0)
            )
            check = "ok" if good else "MISMATCH"
        else:
            notes.append(f"not checked: no {provider.baseline} result to check against")
        peak = common.peak_extra_bytes(context.device, case.step)
        ms, graph_ms, host_ms, note = common.time_call_graphed(context, case.step)
        yield _record(
            provider,
            shape,
            "fwd+bwd",
            "ok",
            dtype,
            backend=op_backend(provider, context.device),
            ms=ms,
            graph_ms=graph_ms,
            peak_GiB=None if peak is None else peak / 2**30,
            first_call_s=first_call_s,
            loss=outputs.loss,
            max_rel_err=loss_error,
            grad_rel_err=grad_error,
            check=check,
            host_ms=host_ms,
            note="; ".join(part for part in (*notes, note) if part),
        )

    return common.measure_passes(context, provider, shape, body(), _record, passes=("fwd+bwd",))


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def _finish(records: list[Record]) -> None:
    """Provider order; speedups and memory ratios against each record's baseline."""
    records.sort(key=lambda r: _ORDER.get(r["provider"], len(_ORDER)))
    timed = {r["provider"]: r for r in records if r["status"] == "ok"}
    for record in records:
        base = timed.get(record["baseline"])
        if record["status"] != "ok" or base is None:
            continue
        record["speedup"] = _ratio(base["ms"], record["ms"])
        record["memory_ratio"] = _ratio(record["peak_GiB"], base["peak_GiB"])


def run(
    context: BenchContext, shapes: Sequence[Shape] | None = None
) -> tuple[list[Record], list[str]]:
    """Time every provider at every shape. Returns (records, notes)."""
    shapes, notes = common.choose_shapes(
        context,
        shapes,
        full=SHAPES,
        quick=QUICK_SHAPES,
        cpu=CPU_SHAPES,
        cpu_scaling="rows and K / 16, MLP 256-512-512-256",
        gpu_kernels=["the fused op's Triton kernels"],
    )
    if context.device.type != "cuda":
        notes.append(
            "on the CPU the fused rows ran prototype_cross_entropy's torch backend (the Triton "
            "interpreter would take minutes): they check the plumbing and the loss, their numbers "
            "are not meaningful; no peak memory or CUDA-graph times without a GPU"
        )
    state = _Run(context.device)

    def measure(context: BenchContext, provider: Any, shape: Any) -> list[Record]:
        return _measure(context, provider, shape, state)

    records = common.run_providers(
        context,
        shapes,
        PROVIDERS,
        status=provider_status,
        measure=measure,
        record=_record,
        finish_shape=_finish,
        passes=("fwd+bwd",),
    )
    return records, notes


# --- tables --------------------------------------------------------------------------------------


def _order(record: Record) -> tuple:
    sizes = (record["rows"], record["prototypes"], record["bottleneck"], record["head"])
    return sizes, _ORDER.get(record["provider"], len(_ORDER))


def _error_cell(record: Record, field: str) -> str:
    if record["status"] == "ok" and record["provider"] == record["baseline"]:
        return "ref"
    return common.error(record[field])


def _cells(record: Record) -> list[str]:
    return [
        record["shape"],
        record["head"],
        record["provider"],
        record["teacher"],
        common.number(record["ms"], 3),
        common.number(record["graph_ms"], 3),
        common.number(record["peak_GiB"], 3),
        common.percent(record["memory_ratio"]),
        common.speedup(record["speedup"]),
        common.number(record["first_call_s"], 1),
        common.number(record["loss"], 5),
        _error_cell(record, "max_rel_err"),
        _error_cell(record, "grad_rel_err"),
        "MISMATCH" if record["check"] == "MISMATCH" else record["note"],
    ]


def table(records: Sequence[Record]) -> Table:
    """One row per timed provider x shape; skipped providers are listed under it."""
    result = common.provider_table(
        "DINO head + cross-entropy, forward+backward (median ms eager and CUDA-graph replay; peak "
        "GiB above inputs and weights)",
        [
            "shape",
            "head",
            "provider",
            "teacher",
            "ms",
            "graph ms",
            "peak GiB",
            "mem vs base",
            "vs base",
            "first s",
            "loss",
            "loss err",
            "grad err",
            "note",
        ],
        records,
        _cells,
        passes=("fwd+bwd",),
        order=_order,
    )
    result.notes.append(
        "shape: ROWSxKxF; head: in-hidden-hidden-F-K; base: torch (torch-sinkhorn for the "
        "Sinkhorn rows) at the same shape; mem vs base: peak over the base's; vs base: the base's "
        "ms over this one; first s: the first call (compile, autotuning); loss err: |loss - base| "
        "/ |base|; grad err: max |g - g_base| / max |g_base| over the head's parameter gradients "
        "and the teacher mean; ref: the base itself"
    )
    return result


def _headline_shape(record: Record) -> bool:
    return (
        record["rows"] == ROWS
        and record["prototypes"] in REFERENCE
        and record["bottleneck"] == 256
        and (record["in_dim"], record["hidden"]) == (1024, 2048)
        and record["dtype"] == "bf16"
        and record["teacher"] == "centering"
    )


def _verdict(fused: Record, base_ms: float, base_peak: float | None) -> str:
    if fused["status"] == "error":
        return f"error: {fused['note']}"
    if fused["check"] == "MISMATCH":
        return "MISMATCH: wrong results"
    if fused["peak_GiB"] is None or base_peak is None:
        return "no memory numbers"
    fraction = fused["peak_GiB"] / base_peak
    time_ratio = fused["ms"] / base_ms
    missed = []
    if fraction > TARGET_MEMORY_FRACTION:
        missed.append(f"memory {fraction:.0%} of torch")
    if time_ratio > 1.0:
        missed.append(f"time {time_ratio:.2f}x torch")
    return "met" if not missed else f"missed ({', '.join(missed)})"


def headline(records: Sequence[Record]) -> Table | None:
    """Per K of TARGETS.md (2816 rows, bf16, centering): fused against torch, or None if fused was
    not measured there."""
    chosen = [r for r in records if _headline_shape(r) and r["status"] in ("ok", "error")]
    if not any(r["provider"] == "fused" for r in chosen):
        return None
    result = Table(
        f"DINO head + loss at {ROWS} rows, forward+backward, against TARGETS.md",
        [
            "K",
            "provider",
            "ms",
            "graph ms",
            "peak GiB",
            "mem vs torch",
            "vs torch",
            "target",
            "verdict",
        ],
    )
    for prototypes in sorted(REFERENCE):
        at_k = {r["provider"]: r for r in chosen if r["prototypes"] == prototypes}
        fused = at_k.get("fused")
        if fused is None:
            continue
        reference_ms, reference_gib = REFERENCE[prototypes]
        torch_record = at_k.get("torch")
        if torch_record is not None and torch_record["status"] == "ok":
            base_ms, base_peak, source = torch_record["ms"], torch_record["peak_GiB"], ""
        else:
            base_ms, base_peak = reference_ms, reference_gib
            source = " (torch not measured: TARGETS.md's numbers)"
        for name in ("torch", "torch.compile", "fused"):
            record = at_k.get(name)
            if record is None:
                continue
            target = verdict = ""
            if name == "fused":
                target = (
                    f"<= {TARGET_MEMORY_FRACTION:.0%} of torch's GiB, <= its ms (TARGETS: "
                    f"{TARGET_MEMORY_FRACTION * reference_gib:.2f} GiB, {reference_ms} ms)"
                )
                verdict = _verdict(record, base_ms, base_peak) + source
            ok = record["status"] == "ok"
            result.rows.append(
                [
                    str(prototypes),
                    name,
                    common.number(record["ms"], 3),
                    common.number(record["graph_ms"], 3),
                    common.number(record["peak_GiB"], 3),
                    common.percent(_ratio(record["peak_GiB"], base_peak) if ok else None),
                    common.speedup(_ratio(base_ms, record["ms"]) if ok else None),
                    target,
                    verdict,
                ]
            )
    result.notes.append(
        "TARGETS.md on an H100 80GB HBM3 (plain PyTorch, ms and peak extra GiB): "
        + ", ".join(f"K={k}: {ms} ms, {gib} GiB" for k, (ms, gib) in REFERENCE.items())
        + "; the verdict holds fused against torch measured in the same run (eager ms, peak memory)"
    )
    return result


BENCHMARK = Benchmark(
    name="head-loss",
    summary="DINO head + prototype cross-entropy forward+backward at the rows of a ViT-L step: "
    "the fused op vs plain PyTorch and torch.compile; time and peak memory per K",
    shapes_help="K or ROWSxKxF,... (e.g. 65536,2816x131072x256; the MLP is 1024-2048-2048-F)",
    parse_shapes=parse_shapes,
    run=run,
    table=table,
    headline=headline,
)
