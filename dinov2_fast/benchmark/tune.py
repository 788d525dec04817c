"""``dinov2-fast bench tune``: time every op's backends at each shape class, write the table that
``backend="auto"`` chooses by (:mod:`dinov2_fast.backend_table`).

For each measurement of :func:`plan` (an op at a shape representative of one shape class) every
backend of the op that runs here ("triton", "cuda", "torch") is built on the same seeded inputs,
its forward output checked against the torch backend's (``max |out - torch| / max |torch|`` at
most :data:`TOLERANCE`; over it the backend is rejected, not timed), then its forward+backward
(the training pass: the inputs' gradients from ``torch.autograd.grad``) is timed twice, as the
other benchmarks time (``dinov2_fast.benchmark.timing.Timer``: the median of ``do_bench``):

- ``graph_ms``: replays of the call captured once in a CUDA graph: the GPU's time, what "auto"
  compares (eager calls of small ops are host-bound, see bench/RESULTS.md);
- ``eager_ms``: eager calls, what a loop without graphs sees; a record, not compared.

Shapes are DINOv2's (see :func:`plan`): attention at head dims 64 and 128 with 1024 channels
(ViT-L's 16 heads of 64; ViT-S/B/g also use 64), ViT crops of 257 and 37 tokens (224 and 96 px),
1370 tokens (518 px) and 4096 tokens, dense and packed; LayerNorm and the stochastic-depth ops at
widths 384, 1024 and 1536 (ViT-S, ViT-B/L, ViT-g) over 16 or 64 crops of 257 tokens, in the
low-precision dtype and with an fp32 residual stream under autocast. The dtypes are bf16 then
fp16 (``--dtype`` picks one). About a minute on an H100; ``time_limit_s`` stops starting new
measurements, and the table lists what it left out.
"""

from __future__ import annotations

import datetime
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dinov2_fast import _backend, _environment, backend_table
from dinov2_fast.benchmark import DTYPES, Table
from dinov2_fast.benchmark.timing import Timer, first_line

__all__ = [
    "DEFAULT_DTYPES",
    "TOLERANCE",
    "Built",
    "Measurement",
    "measure",
    "plan",
    "plan_table",
    "run",
    "summary_table",
]

DEFAULT_DTYPES = ("bf16", "fp16")
# max |out - torch| / max |torch| of a backend's forward output, by the output's dtype.
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 6e-3, torch.float32: 1e-3}
# do_bench budgets (ms) per timing: graph replays of these ops take 0.02 to 3 ms.
WARMUP_MS, REP_MS = 5, 30
QUICK_WARMUP_MS, QUICK_REP_MS = 2, 10
ATTENTION_CHANNELS = 1024  # heads x head dim, ViT-L's
HEAD_DIMS = (64, 128)
GLOBAL_TOKENS, LOCAL_TOKENS, TOKENS_518, LONG_TOKENS = 257, 37, 1370, 4096
WIDTHS = (384, 1024, 1536)
CROPS = (16, 64)  # global crops of one step: rows 4112 (<= 8192) and 16448 (> 8192)
KEEP = 0.6  # stochastic depth at drop rate 0.4 keeps max(int(0.6 B), 1) samples
OUT_OF_TIME = "out of time (--time-limit)"


@dataclass(frozen=True)
class Built:
    """A backend's call at one measurement: ``forward()`` returns the output (for the check),
    ``fwd_bwd()`` runs forward and backward and returns the gradients (what is timed)."""

    forward: Callable[[], torch.Tensor]
    fwd_bwd: Callable[[], object]


@dataclass(frozen=True)
class Measurement:
    """One op at one representative shape of ``shape_class``; ``build(backend, device)`` makes
    seeded inputs (the same for every backend) and returns the :class:`Built` call."""

    op: str
    shape_class: str
    shape: str
    build: Callable[[str, torch.device], Built]


# --- inputs --------------------------------------------------------------------------------------


def _randn(generator: torch.Generator, device: torch.device, dtype: torch.dtype, *size: int):
    return torch.randn(*size, generator=generator, device=device).to(dtype)


def _norm_affine(generator: torch.Generator, device: torch.device, dtype: torch.dtype, width: int):
    """A LayerNorm's (weight, bias), near (1, 0) but not at it, both requiring grad."""
    weight = (1 + 0.1 * _randn(generator, device, dtype, width)).requires_grad_()
    bias = (0.1 * _randn(generator, device, dtype, width)).requires_grad_()
    return weight, bias


def _kept(batch: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    count = max(int(batch * KEEP), 1)
    return torch.randperm(batch, generator=generator, device=device)[:count].sort().values


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def _grads(forward: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor], seed: int):
    """``fwd_bwd`` of ``forward``: the gradients of ``leaves`` for a fixed random dO."""
    dout: list[torch.Tensor] = []

    def fwd_bwd() -> tuple[torch.Tensor, ...]:
        out = forward()
        if not dout:  # made once, outside any CUDA graph capture (the first call is a warm-up)
            generator = torch.Generator(device=out.device).manual_seed(seed)
            dout.append(_randn(generator, out.device, out.dtype, *out.shape))
        return torch.autograd.grad(out, leaves, dout[0])

    return fwd_bwd


# --- the measurements ----------------------------------------------------------------------------


def _attention(dtype: torch.dtype, head_dim: int, groups, packed: bool) -> Callable:
    from dinov2_fast.ops import BlockDiagonalMask, attention_qkvpacked

    heads = ATTENTION_CHANNELS // head_dim

    def build(backend: str, device: torch.device) -> Built:
        generator = torch.Generator(device=device).manual_seed(0)
        if packed:
            mask = BlockDiagonalMask([tokens for batch, tokens in groups for _ in range(batch)])
            qkv = _randn(generator, device, dtype, mask.total, 3, heads, head_dim)

            def forward() -> torch.Tensor:
                # The mask's lengths are Python ints: no host sync, so the call can be captured.
                return attention_qkvpacked(qkv, cu_seqlens=mask, backend=backend)

        else:
            ((batch, tokens),) = groups
            qkv = _randn(generator, device, dtype, batch, tokens, 3, heads, head_dim)

            def forward() -> torch.Tensor:
                return attention_qkvpacked(qkv, backend=backend)

        qkv.requires_grad_()
        return Built(forward, _grads(forward, [qkv], 1))

    return build


def _layer_norm(width: int, rows: int, x_dtype: torch.dtype, out_dtype: torch.dtype) -> Callable:
    from dinov2_fast.ops import layer_norm

    def build(backend: str, device: torch.device) -> Built:
        generator = torch.Generator(device=device).manual_seed(0)
        x = _randn(generator, device, x_dtype, rows, width).requires_grad_()
        weight, bias = _norm_affine(generator, device, x_dtype, width)
        autocast_to = out_dtype if out_dtype != x_dtype else None

        def forward() -> torch.Tensor:
            with _autocast(device, autocast_to):
                return layer_norm(x, weight, bias, backend=backend)

        return Built(forward, _grads(forward, [x, weight, bias], 1))

    return build


def _index_select_layer_norm(
    width: int, batch: int, x_dtype: torch.dtype, out_dtype: torch.dtype
) -> Callable:
    from dinov2_fast.ops import index_select_layer_norm

    def build(backend: str, device: torch.device) -> Built:
        generator = torch.Generator(device=device).manual_seed(0)
        source = _randn(generator, device, x_dtype, batch, GLOBAL_TOKENS, width).requires_grad_()
        index = _kept(batch, generator, device)
        weight, bias = _norm_affine(generator, device, x_dtype, width)
        autocast_to = out_dtype if out_dtype != x_dtype else None

        def forward() -> torch.Tensor:
            with _autocast(device, autocast_to):
                return index_select_layer_norm(
                    [source], [index], weight, bias, validate=False, backend=backend
                )

        return Built(forward, _grads(forward, [source, weight, bias], 1))

    return build


def _index_select_cat(width: int, batch: int, dtype: torch.dtype) -> Callable:
    from dinov2_fast.ops import index_select_cat

    def build(backend: str, device: torch.device) -> Built:
        generator = torch.Generator(device=device).manual_seed(0)
        source = _randn(generator, device, dtype, batch, GLOBAL_TOKENS, width).requires_grad_()
        index = _kept(batch, generator, device)

        def forward() -> torch.Tensor:
            return index_select_cat([source], [index], validate=False, backend=backend)

        return Built(forward, _grads(forward, [source], 1))

    return build


def _scaled_index_add(
    width: int, batch: int, x_dtype: torch.dtype, source_dtype: torch.dtype
) -> Callable:
    from dinov2_fast.ops import scaled_index_add

    def build(backend: str, device: torch.device) -> Built:
        generator = torch.Generator(device=device).manual_seed(0)
        x = _randn(generator, device, x_dtype, batch, GLOBAL_TOKENS, width).requires_grad_()
        index = _kept(batch, generator, device)
        source = _randn(generator, device, source_dtype, len(index), GLOBAL_TOKENS, width)
        source.requires_grad_()
        # LayerScale's gamma, far from its 1e-5 init so that the check sees the added term.
        gamma = (0.5 + torch.rand(width, generator=generator, device=device)).requires_grad_()
        alpha = batch / len(index)

        def forward() -> torch.Tensor:
            return scaled_index_add(x, index, source, gamma, alpha, validate=False, backend=backend)

        return Built(forward, _grads(forward, [x, source, gamma], 1))

    return build


def _attention_shape(groups, heads: int, head_dim: int, packed: bool) -> str:
    """The attention benchmark's shape name: ``64x257x16x64``, ``packed(64x257+256x37)x16x64``."""
    crops = "+".join(f"{batch}x{tokens}" for batch, tokens in groups)
    return f"{f'packed({crops})' if packed else crops}x{heads}x{head_dim}"


def plan(dtypes: Sequence[str] = DEFAULT_DTYPES, *, quick: bool = False) -> list[Measurement]:
    """The measurements, most used first: for each dtype (a name of ``benchmark.DTYPES``) the
    ViT shapes at head dim 64, LayerNorm, the stochastic-depth ops, then head dim 128. A shape
    class reached twice (the fp32 stream of a second dtype) is measured once. ``quick``: one
    small shape per op (a smoke test, not a table to keep)."""
    measurements: dict[tuple[str, str, str], Measurement] = {}

    def add(op: str, cls: str, shape: str, build: Callable) -> None:
        measurements.setdefault((op, cls, shape), Measurement(op, cls, shape, build))

    for name in dtypes:
        low = DTYPES[name]
        attention_cases = _attention_cases(quick)
        head_dims = HEAD_DIMS[:1] if quick else HEAD_DIMS
        _add_attention(add, low, head_dims[0], attention_cases)
        widths = WIDTHS[1:2] if quick else WIDTHS
        crops = CROPS[:1] if quick else CROPS
        for width in widths:
            for batch in crops:
                rows = batch * GLOBAL_TOKENS
                for x_dtype in (low, torch.float32):
                    cls = backend_table.shape_class(
                        "layer_norm", width=width, rows=rows, dtype=x_dtype, out_dtype=low
                    )
                    add(
                        "layer_norm", cls, f"{rows}x{width}", _layer_norm(width, rows, x_dtype, low)
                    )
        for width in widths:
            for batch in crops:
                kept_rows = max(int(batch * KEEP), 1) * GLOBAL_TOKENS
                shape = f"{batch}x{GLOBAL_TOKENS}x{width} (keep {max(int(batch * KEEP), 1)})"
                for x_dtype in (low, torch.float32):
                    cls = backend_table.shape_class(
                        "index_select_layer_norm",
                        width=width,
                        rows=kept_rows,
                        dtype=x_dtype,
                        out_dtype=low,
                    )
                    add(
                        "index_select_layer_norm",
                        cls,
                        shape,
                        _index_select_layer_norm(width, batch, x_dtype, low),
                    )
                    cls = backend_table.shape_class(
                        "index_select_cat", width=width, rows=kept_rows, dtype=x_dtype
                    )
                    add("index_select_cat", cls, shape, _index_select_cat(width, batch, x_dtype))
                    cls = backend_table.shape_class(
                        "scaled_index_add",
                        width=width,
                        rows=batch * GLOBAL_TOKENS,
                        dtype=x_dtype,
                        source_dtype=low,
                    )
                    add(
                        "scaled_index_add",
                        cls,
                        shape,
                        _scaled_index_add(width, batch, x_dtype, low),
                    )
        for head_dim in head_dims[1:]:
            _add_attention(add, low, head_dim, attention_cases)
    return list(measurements.values())


def _attention_cases(quick: bool) -> list[tuple[tuple[tuple[int, int], ...], bool]]:
    """(crop groups, packed) of the attention measurements, ViT crops first."""
    if quick:
        return [(((4, GLOBAL_TOKENS),), False), (((4, GLOBAL_TOKENS), (16, LOCAL_TOKENS)), True)]
    return [
        (((64, GLOBAL_TOKENS),), False),  # 32 images x 2 global crops
        (((256, LOCAL_TOKENS),), False),  # 32 images x 8 local crops
        (((64, GLOBAL_TOKENS), (256, LOCAL_TOKENS)), True),  # both in one packed call
        (((16, TOKENS_518),), False),
        (((8, TOKENS_518), (64, GLOBAL_TOKENS)), True),
        (((4, LONG_TOKENS),), False),
        (((2, LONG_TOKENS), (8, TOKENS_518)), True),
    ]


def _add_attention(add, dtype: torch.dtype, head_dim: int, cases) -> None:
    heads = ATTENTION_CHANNELS // head_dim
    for groups, packed in cases:
        cls = backend_table.shape_class(
            "attention",
            head_dim=head_dim,
            seqlen=max(tokens for _, tokens in groups),
            packed=packed,
            dtype=dtype,
        )
        shape = _attention_shape(groups, heads, head_dim, packed)
        add("attention", cls, shape, _attention(dtype, head_dim, groups, packed))


# --- measuring -----------------------------------------------------------------------------------


def _relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    out, reference = out.detach().double(), reference.detach().double()
    scale = reference.abs().max().item()
    return (out - reference).abs().max().item() / (scale if scale > 0 else 1.0)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def backends_here(op: str, device: torch.device) -> list[str]:
    """The backends of ``op`` that run on ``device``, in ``AUTO_PREFERENCE`` order."""
    return [b for b in _backend.AUTO_PREFERENCE[op] if not _backend.unavailable_reason(b, device)]


def measure(measurement: Measurement, device: torch.device, timer: Timer) -> dict[str, Any]:
    """One measurement's record for the table: ``graph_ms`` and ``eager_ms`` per backend that
    ran and matched the torch backend, ``rejected`` (backend -> why) for the others."""
    record: dict[str, Any] = {
        "shape": measurement.shape,
        "pass": "fwd+bwd",
        "graph_ms": {},
        "eager_ms": {},
        "rejected": {},
    }
    reference = None
    backends = backends_here(measurement.op, device)
    # The torch backend first: its output is what the others are checked against.
    for backend in sorted(backends, key=lambda b: b != "torch"):
        try:
            built = measurement.build(backend, device)
            with torch.no_grad():
                out = built.forward()
            if backend == "torch":
                reference = out
            elif reference is not None:
                error = _relative_error(out, reference)
                tolerance = TOLERANCE.get(out.dtype, 0.0)
                if not error <= tolerance:  # NaN fails too
                    record["rejected"][backend] = (
                        f"max |out - torch| / max |torch| = {error:.1e}, over {tolerance:g}"
                    )
                    continue
            del out
            record["eager_ms"][backend] = round(timer(built.fwd_bwd), 5)
            graph_ms, why = timer.graph_ms(built.fwd_bwd)
            if graph_ms is None:
                record["rejected"][backend] = f"eager time only: {why}"
            else:
                record["graph_ms"][backend] = round(graph_ms, 5)
        except Exception as error:  # one broken backend must not stop the others
            record["rejected"][backend] = first_line(error)
        finally:
            built = None
            _free(device)
    order = {backend: i for i, backend in enumerate(backends)}
    for key in ("graph_ms", "eager_ms"):
        record[key] = dict(sorted(record[key].items(), key=lambda item: order[item[0]]))
    if not record["rejected"]:
        del record["rejected"]
    return record


def _commit() -> str | None:
    """The checkout's commit (``+dirty`` with uncommitted changes), or None outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head


def run(
    device: torch.device,
    *,
    dtypes: Sequence[str] = DEFAULT_DTYPES,
    quick: bool = False,
    time_limit_s: float | None = None,
    progress: Callable[[str], None] | None = None,
    measurements: Sequence[Measurement] | None = None,
    timer: Timer | None = None,
) -> dict[str, Any]:
    """Time :func:`plan` (or ``measurements``) on the CUDA ``device`` and return the table (see
    ``backend_table``'s format), stamped with the GPU, the versions, the date and the commit."""
    if device.type != "cuda":
        raise ValueError(f"bench tune times GPU kernels: device must be CUDA, got {device}")
    if measurements is None:
        measurements = plan(dtypes, quick=quick)
    if timer is None:
        warmup, rep = (QUICK_WARMUP_MS, QUICK_REP_MS) if quick else (WARMUP_MS, REP_MS)
        timer = Timer(device, warmup_ms=warmup, rep_ms=rep)
    deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
    major, minor = torch.cuda.get_device_capability(device)
    versions = _environment.versions()
    ops: dict[str, dict[str, list[dict[str, Any]]]] = {}
    left_out: list[dict[str, str]] = []
    start = time.monotonic()
    for i, measurement in enumerate(measurements):
        where = {"op": measurement.op, "class": measurement.shape_class}
        if deadline is not None and time.monotonic() >= deadline:
            left_out.append({**where, "shape": measurement.shape, "why": OUT_OF_TIME})
            continue
        if progress is not None:
            progress(
                f"tune [{i + 1}/{len(measurements)}] {measurement.op} "
                f"{measurement.shape_class}: {measurement.shape}"
            )
        record = measure(measurement, device, timer)
        ops.setdefault(measurement.op, {}).setdefault(measurement.shape_class, []).append(record)
    cuda_reason = _backend.unavailable_reason("cuda", device)
    table = {
        "format": backend_table.FORMAT,
        "device": torch.cuda.get_device_name(device),
        "compute_capability": f"{major}.{minor}",
        "torch": versions["torch"],
        "torch_cuda": versions["torch_cuda"],
        "triton": versions["triton"],
        "python": versions["python"],
        "dinov2_fast": versions["dinov2_fast"],
        "cuda_extension": "built" if not cuda_reason else f"not used: {cuda_reason}",
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": "dinov2-fast bench tune" + (" --quick" if quick else ""),
        "dtypes": list(dtypes),
        "time_limit_s": time_limit_s,
        "seconds": round(time.monotonic() - start, 1),
        "notes": [
            "graph_ms: median of do_bench over CUDA-graph replays of forward+backward (the GPU's "
            "time); backend='auto' compares these. eager_ms: the same call run eagerly, a record.",
            "each backend's forward output was checked against the torch backend's on the same "
            "seeded inputs; rejected: backends not compared, and why",
        ],
        "ops": ops,
        "not_measured": left_out,
    }
    if quick:
        table["notes"].append("--quick: small shapes and few repetitions; not a table to keep")
    return table


# --- tables --------------------------------------------------------------------------------------


def _times(times: dict[str, float]) -> str:
    return ", ".join(f"{backend} {ms:.4f}" for backend, ms in times.items()) or "-"


def summary_table(table: dict[str, Any], device: torch.device | None = None) -> Table:
    """One row per (op, shape class) of ``table``: the summed graph and eager ms per backend and
    the backend "auto" takes by it (among those that run on ``device``, else all measured)."""
    loaded = backend_table.BackendTable("tune", table)
    result = Table(
        f"Backend table for {table['device']} (forward+backward, ms summed over the class's "
        "shapes; auto compares graph ms)",
        ["op", "shape class", "shapes", "graph ms", "eager ms", "auto", "note"],
    )
    for op, classes in table["ops"].items():
        for cls, records in classes.items():
            graph: dict[str, float] = {}
            eager: dict[str, float] = {}
            for record in records:
                for key, totals in (("graph_ms", graph), ("eager_ms", eager)):
                    for backend, ms in record.get(key, {}).items():
                        totals[backend] = totals.get(backend, 0.0) + ms
            if device is not None:
                available = backends_here(op, device)
            else:
                available = list(dict.fromkeys(graph))
            rejected = {
                f"{backend}: {why}"
                for record in records
                for backend, why in record.get("rejected", {}).items()
            }
            result.rows.append(
                [
                    op,
                    cls,
                    "; ".join(record["shape"] for record in records),
                    _times(graph),
                    _times(eager),
                    loaded.decide(op, cls, available) or "-",
                    "; ".join(sorted(rejected)),
                ]
            )
    for item in table.get("not_measured", []):
        result.notes.append(f"not measured: {item['op']} {item['class']} ({item['why']})")
    return result


def plan_table(measurements: Sequence[Measurement], device: torch.device | None) -> Table:
    """What :func:`run` would time: one row per measurement, with the backends that run here."""
    result = Table(
        "bench tune: the measurements (forward+backward of each backend)",
        ["op", "shape class", "shape", "backends" + ("" if device is not None else " (no GPU)")],
    )
    for measurement in measurements:
        backends = (
            backends_here(measurement.op, device)
            if device is not None
            else _backend.AUTO_PREFERENCE[measurement.op]
        )
        result.rows.append(
            [measurement.op, measurement.shape_class, measurement.shape, ", ".join(backends)]
        )
    result.notes.append(
        f"{len(measurements)} measurements; each times every backend listed, forward+backward, "
        "eagerly and as a CUDA-graph replay"
    )
    return result
