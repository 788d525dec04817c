"""Stochastic-depth ops benchmark: the gather and the fused residual update of DINOv2's efficient
stochastic depth, at the sizes of a ViT-L multi-crop step, in GB/s of must-move bytes.

DINOv2 runs each residual branch on a random subset of ``k = max(int(B·(1 - p)), 1)`` samples of
each crop group (drop rate ``p`` = :data:`DROP_RATE`, 0.4) and adds the result back, scaled by
``B / k`` and LayerScale's gamma. Three ops are timed (a "workload" is an op at one shape and one
residual-stream dtype; the default shape is the ViT-L step :data:`STEP`: global crops
``[64, 257, 1024]`` and local crops ``[256, 50, 1024]``, so k = 38 and 153):

- ``index_select_cat``: the kept samples of both crop groups gathered into one flat buffer, in ONE
  call (``sources`` are the residual stream; ``fwd`` and ``fwd+bwd``: the sources' gradients);
- ``index_select_layer_norm``: the same gather fused with the branch's LayerNorm (weight and bias
  fp32, under autocast to the ``--dtype``: the normalised rows come out in the branch dtype), ONE
  call; against gather-then-LayerNorm, which reads the kept rows twice;
- ``scaled_index_add``: the residual update out of place, ``x + alpha · gamma · source`` at the kept
  samples, one call per crop group back to back (x ``[B, N, C]`` the stream, source ``[k, N, C]``
  the branch output, gamma ``[C]`` fp32, alpha ``B / k``; ``fwd`` and ``fwd+bwd``: gradients for x,
  source and gamma);
- ``scaled_index_add_inplace``: the same added into x itself (``fwd`` only; no autograd).

The stream is fp32 (the residual stream under autocast) and the ``--dtype`` (bf16 by default); the
branch output (source) has the ``--dtype``; gamma is fp32. ``fwd`` is the forward of a training step
(inputs require grad, except for the in-place op); ``fwd+bwd`` adds ``torch.autograd.grad``.

Providers (see :data:`PROVIDERS`):

- ``ours``: ``dinov2_fast.ops.index_select_cat`` / ``scaled_index_add(..., inplace=...)`` with
  ``backend="auto"`` (on a GPU what the measured table or the preference order picks, recorded
  as ``backend``; the torch reference on the CPU) and ``validate=False``;
- ``triton``, ``cuda``: the same calls with that backend (GPU only; skipped with the reason where
  it cannot run, e.g. the CUDA extension not built or no CUDA kernel for the op);
- ``torch``: eager, as DINOv2 writes it: ``torch.cat([s.index_select(0, i).flatten() ...])``;
  ``torch.index_add(x, 0, i, (source * gamma).to(x.dtype), alpha=alpha)``; in place
  ``x.index_add_(...)`` with the same arguments;
- ``torch.compile``: those eager functions compiled (one compile per workload);
- ``xformers`` (when installed): ``xformers.ops.index_select_cat`` on the sources flattened to
  ``[B, N·C]``; ``xformers.ops.scaled_index_add``, which adds in place and needs source in x's dtype:
  out of place it is given ``x.clone()`` and ``source.to(x.dtype)`` (DINOv2's call), in place x.

Byte model: the bytes any implementation must move, each input read once and each output written
once. With ``S = Σ B·N·C`` (every sample of the stream), ``K = Σ k·N·C`` (the kept samples),
``|x|`` the stream's and ``|s|`` the branch's bytes per element::

    index_select_cat  fwd      read K of the sources, write K                       2K|x|
                      fwd+bwd  fwd, read the gradient (K), write the sources'       (3K + S)|x|
                               gradients (all S: zero where not kept)
    index_select_     fwd      read K of the sources, write the normalised rows     K(|x| + |s|)
      layer_norm      fwd+bwd  fwd, read dy (K|s|) and the kept rows again (K|x|),  K(2|x| + 2|s|)
                               write the sources' gradients (S|x|)                    + S|x|
    scaled_index_add  fwd      read x (S) and source (K), write the new stream (S)  2S|x| + K|s|
                      fwd+bwd  fwd, read the gradient at the kept rows (K|x|) and   2S|x| + K(|x| + 3|s|)
                               source again (for gamma's gradient), write
                               grad_source (K|s|); x's gradient is the incoming one
    scaled_index_add  fwd      read the kept rows of x and source, write them       K(2|x| + |s|)
      _inplace

Not counted: the indices (k int64 per group), gamma and its gradient, LayerNorm's weight, bias
and their gradients (``O(C)``). At the ViT-L step (S = 29.9M, K = 17.8M elements) with an fp32
stream and a bf16 branch: 143, 334, 107, 333, 275, 418 and 178 MB for the seven rows above (bf16
stream: 71, 167, 71, 202, 156, 262, 107 MB).
GB/s is these bytes over the median time (1 GB = 1e9 bytes), from the CUDA-graph time when the
capture worked (see below), else from the eager time; "copy" is that as a fraction of the device's
measured copy bandwidth. The target (TARGETS.md, "Stochastic depth") is 80% of the copy bandwidth.

Timing: ``ms`` is the median of ``do_bench`` on eager calls, what a training loop sees, which at
these sizes (tens of microseconds of kernels) is bounded by launch overhead on the host;
``graph_ms`` is the median of replaying the same call captured once in a CUDA graph (CUDA only;
where the capture fails the note says why and only ``ms`` is reported). Speedups against torch
eager compare graph times when both have one, else eager times.

Each provider's outputs and gradients are checked once against float64 on its own inputs, with
``err(t) = max |t - ref| / max |ref|``: ``max_rel_err`` is err(out) for ``fwd`` and the largest of
err(out) and the gradients of the stream and the source for ``fwd+bwd``, whose ``param_rel_err`` is
err(gamma's gradient). Over the tolerance (the looser of the stream's and the branch's dtype; 8
times that for gamma's gradient, a sum over all kept rows) the record says ``"check": "MISMATCH"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from dinov2_fast import _backend, backend_table
from dinov2_fast.benchmark import BenchContext, Benchmark, Record, Table, common, dtype_name
from dinov2_fast.benchmark.common import PASSES
from dinov2_fast.ops.index_select_cat import index_select_cat
from dinov2_fast.ops.index_select_layer_norm import index_select_layer_norm
from dinov2_fast.ops.scaled_index_add import scaled_index_add

__all__ = [
    "BENCHMARK",
    "DROP_RATE",
    "OPS",
    "PROVIDERS",
    "QUICK_SHAPES",
    "SHAPES",
    "STEP",
    "Case",
    "Provider",
    "Shape",
    "Workload",
    "check_case",
    "make_case",
    "must_move_bytes",
    "parse_shapes",
    "provider_status",
    "run",
    "workloads",
]

DROP_RATE = 0.4
LAYER_NORM_EPS = 1e-6
OPS = (
    "index_select_cat",
    "index_select_layer_norm",
    "scaled_index_add",
    "scaled_index_add_inplace",
)
# The op each workload's resolved backend is looked up for (ops._backend's names).
_BACKEND_OP = {
    "index_select_cat": "index_select_cat",
    "index_select_layer_norm": "index_select_layer_norm",
    "scaled_index_add": "scaled_index_add",
    "scaled_index_add_inplace": "scaled_index_add",
}
TARGET_COPY_FRACTION = 0.8
# max |out - ref| / max |ref| per dtype; gamma's gradient gets PARAM_TOLERANCE_FACTOR times that.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-5}
PARAM_TOLERANCE_FACTOR = 8
CPU_BATCH_DIVISOR = 16


# --- shapes and workloads ------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """Crop groups ``(B, N)`` of one channel width ``C``: the residual streams of one step."""

    groups: tuple[tuple[int, int], ...]
    dim: int

    @property
    def name(self) -> str:
        return "+".join(f"{batch}x{tokens}x{self.dim}" for batch, tokens in self.groups)

    @property
    def kept(self) -> tuple[int, ...]:
        """k per group: DINOv2's ``max(int(B·(1 - p)), 1)`` at :data:`DROP_RATE`."""
        return tuple(max(int(batch * (1 - DROP_RATE)), 1) for batch, _ in self.groups)

    @property
    def elements(self) -> int:
        """S: every sample of every group."""
        return sum(batch * tokens * self.dim for batch, tokens in self.groups)

    @property
    def kept_elements(self) -> int:
        """K: the kept samples of every group."""
        return sum(k * tokens * self.dim for k, (_, tokens) in zip(self.kept, self.groups))

    def scaled_down(self, batch_divisor: int) -> Shape:
        groups = tuple((-(-batch // batch_divisor), tokens) for batch, tokens in self.groups)
        return replace(self, groups=groups)


STEP = Shape(((64, 257), (256, 50)), 1024)  # ViT-L: 32 images x (2 global + 8 local crops)
SHAPES: tuple[Shape, ...] = (STEP,)
QUICK_SHAPES: tuple[Shape, ...] = (Shape(((4, 17), (8, 5)), 64),)


@dataclass(frozen=True)
class Workload:
    """One op at one shape with a residual stream of dtype ``stream`` and a branch of ``branch``."""

    op: str
    shape: Shape
    stream: torch.dtype
    branch: torch.dtype

    @property
    def passes(self) -> tuple[str, ...]:
        return ("fwd",) if self.op == "scaled_index_add_inplace" else PASSES

    @property
    def name(self) -> str:
        return f"{self.op} {self.shape.name} stream {dtype_name(self.stream)}"


def workloads(shapes: Sequence[Shape], dtype: torch.dtype) -> list[Workload]:
    """Every op at every shape, with an fp32 stream and a ``dtype`` one (once if ``dtype`` is fp32);
    the branch has ``dtype``."""
    streams = list(dict.fromkeys((torch.float32, dtype)))
    return [
        Workload(op, shape, stream, dtype) for shape in shapes for op in OPS for stream in streams
    ]


def must_move_bytes(workload: Workload, pass_: str) -> int:
    """The byte model of the module docstring: bytes of ``pass_`` for ``workload``."""
    if pass_ not in workload.passes:
        raise ValueError(f"pass_ must be one of {workload.passes} for {workload.op}, got {pass_!r}")
    big, kept = workload.shape.elements, workload.shape.kept_elements
    x_bytes, s_bytes = common.itemsize(workload.stream), common.itemsize(workload.branch)
    if workload.op == "index_select_cat":
        return 2 * kept * x_bytes if pass_ == "fwd" else (3 * kept + big) * x_bytes
    if workload.op == "index_select_layer_norm":
        forward = kept * (x_bytes + s_bytes)
        return forward if pass_ == "fwd" else 2 * forward + big * x_bytes
    if workload.op == "scaled_index_add":
        forward = 2 * big * x_bytes + kept * s_bytes
        return forward if pass_ == "fwd" else forward + kept * (x_bytes + 2 * s_bytes)
    return kept * (2 * x_bytes + s_bytes)


# --- providers -----------------------------------------------------------------------------------

# The functions a provider gives for each op (see Provider.make):
#   index_select_cat(sources, indices) -> 1-D tensor
#   scaled_index_add(x, index, source, gamma, alpha) -> new stream
#   scaled_index_add_inplace(x, index, source, gamma, alpha) -> anything (x is updated)
OpFn = Callable[..., object]


@dataclass(frozen=True)
class Provider:
    """One implementation to time.

    Attributes:
        name: its name in tables and results.
        description: one line on what it runs.
        make: ``op -> function`` (see ``OpFn``), built once per workload before timing.
        gpu_kernel: a GPU kernel; never timed on the CPU.
        backend: our op's backend, when ours.
        library: import name of an optional library it needs.
        compiles: uses torch.compile (on the CPU only when asked for: compiling is slow there).
    """

    name: str
    description: str
    make: Callable[[str], OpFn]
    gpu_kernel: bool = False
    backend: str | None = None
    library: str | None = None
    compiles: bool = False


def _ours(backend: str) -> Callable[[str], OpFn]:
    def make(op: str) -> OpFn:
        if op == "index_select_cat":
            return lambda sources, indices: index_select_cat(
                sources, indices, validate=False, backend=backend
            )
        if op == "index_select_layer_norm":
            return lambda sources, indices, weight, bias: index_select_layer_norm(
                sources, indices, weight, bias, LAYER_NORM_EPS, validate=False, backend=backend
            )
        inplace = op == "scaled_index_add_inplace"
        return lambda x, index, source, gamma, alpha: scaled_index_add(
            x, index, source, gamma, alpha, inplace=inplace, validate=False, backend=backend
        )

    return make


def _torch_index_select_cat(sources, indices):
    return torch.cat([s.index_select(0, i).flatten() for s, i in zip(sources, indices)])


def _torch_index_select_layer_norm(sources, indices, weight, bias):
    dim = sources[0].shape[-1]
    gathered = torch.cat([s.index_select(0, i).reshape(-1, dim) for s, i in zip(sources, indices)])
    return F.layer_norm(gathered, (dim,), weight, bias, LAYER_NORM_EPS)


def _torch_scaled_index_add(x, index, source, gamma, alpha):
    return torch.index_add(x, 0, index, (source * gamma).to(x.dtype), alpha=alpha)


def _torch_scaled_index_add_inplace(x, index, source, gamma, alpha):
    return x.index_add_(0, index, (source * gamma).to(x.dtype), alpha=alpha)


_TORCH = {
    "index_select_cat": _torch_index_select_cat,
    "index_select_layer_norm": _torch_index_select_layer_norm,
    "scaled_index_add": _torch_scaled_index_add,
    "scaled_index_add_inplace": _torch_scaled_index_add_inplace,
}


def _torch(op: str) -> OpFn:
    return _TORCH[op]


def _compiled(op: str) -> OpFn:
    # A fresh compile per workload: no recompile limit to hit, no shapes turned dynamic.
    torch._dynamo.reset()
    return torch.compile(_TORCH[op], dynamic=False)


def _xformers(op: str) -> OpFn:
    from xformers.ops import index_select_cat as xformers_cat
    from xformers.ops import scaled_index_add as xformers_add

    if op == "index_select_cat":
        return lambda sources, indices: xformers_cat([s.flatten(1) for s in sources], indices)
    if op == "scaled_index_add":
        return lambda x, index, source, gamma, alpha: xformers_add(
            x.clone(), index, source.to(x.dtype), gamma, alpha
        )
    return lambda x, index, source, gamma, alpha: xformers_add(
        x, index, source.to(x.dtype), gamma, alpha
    )


PROVIDERS: tuple[Provider, ...] = (
    Provider(
        "ours",
        "dinov2_fast.ops index_select_cat / scaled_index_add, backend='auto' (on a GPU the backend "
        "the measured table or the preference order picks; the torch reference on the CPU), "
        "validate=False",
        _ours("auto"),
        backend="auto",
    ),
    Provider(
        "triton",
        "the same ops with backend='triton'",
        _ours("triton"),
        gpu_kernel=True,
        backend="triton",
    ),
    Provider(
        "cuda",
        "the same ops with backend='cuda' (the compiled extension)",
        _ours("cuda"),
        gpu_kernel=True,
        backend="cuda",
    ),
    Provider(
        "torch",
        "eager, as DINOv2 writes it: index_select + cat; "
        "torch.index_add(x, 0, i, (source * gamma).to(x.dtype), alpha=alpha)",
        _torch,
    ),
    Provider(
        "xformers",
        "xformers.ops.index_select_cat / scaled_index_add (in place: out of place on x.clone())",
        _xformers,
        gpu_kernel=True,
        library="xformers",
    ),
    Provider(
        "torch.compile",
        "torch.compile of the torch eager functions, one compile per workload",
        _compiled,
        compiles=True,
    ),
)
_BY_NAME = {provider.name: provider for provider in PROVIDERS}
# Our providers, as the headline lists them.
OURS = tuple(provider.name for provider in PROVIDERS if provider.backend is not None)


def provider_status(
    provider: Provider,
    device: torch.device,
    dtype: torch.dtype,
    workload: Workload | None = None,
    *,
    compile_on_cpu: bool = False,
) -> tuple[str, str]:
    """``("ok", "")`` when ``provider`` can be timed, else ``("skipped" | "not timed", why)``."""
    if provider.library == "xformers" and workload and workload.op == "index_select_layer_norm":
        return "skipped", "xFormers has no gather fused with LayerNorm"
    op = None if workload is None else _BACKEND_OP[workload.op]
    return common.availability(provider, device, compile_on_cpu=compile_on_cpu, op=op)


# --- one case: a provider's inputs for one workload ----------------------------------------------


@dataclass
class Case:
    """A provider ready to run one workload: ``fwd()`` and, except in place, ``fwd_bwd()``.

    ``check()`` returns ``(err(out), err(stream and source gradients), err(gamma's gradient))``
    against float64 on the same inputs (the last two None for the in-place op, the last also for
    index_select_cat).
    """

    provider: Provider
    workload: Workload
    fwd: Callable[[], object]
    fwd_bwd: Callable[[], object] | None
    check: Callable[[], tuple[float, float | None, float | None]]

    def timed(self, pass_: str) -> Callable[[], object]:
        fn = self.fwd if pass_ == "fwd" else self.fwd_bwd
        if fn is None:
            raise ValueError(f"{self.workload.op} has no pass {pass_!r}")
        return fn


def _max_error(outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> float:
    return max(common.relative_error(out.detach(), ref.detach()) for out, ref in zip(outs, refs))


def make_case(
    provider: Provider, workload: Workload, *, device: torch.device, seed: int = 0
) -> Case:
    """Random inputs for ``workload`` and ``provider``'s function for it, called once (which
    compiles what needs compiling). The same ``seed`` gives every provider the same values."""
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = workload.shape

    def randn(*size: int, dtype: torch.dtype = workload.stream, grad: bool = False):
        values = torch.randn(*size, generator=generator, device=device, dtype=torch.float32)
        return values.to(dtype).requires_grad_(grad)

    indices = [
        torch.randperm(batch, generator=generator, device=device)[:k]
        for k, (batch, _) in zip(shape.kept, shape.groups)
    ]
    fn = provider.make(workload.op)
    if workload.op == "index_select_layer_norm":
        sources = [randn(batch, tokens, shape.dim, grad=True) for batch, tokens in shape.groups]
        weight = (1 + 0.1 * randn(shape.dim, dtype=torch.float32)).requires_grad_()
        bias = (0.1 * randn(shape.dim, dtype=torch.float32)).requires_grad_()
        dout = randn(shape.kept_elements // shape.dim, shape.dim, dtype=workload.branch)
        case = _layer_norm_case(provider, workload, fn, sources, indices, weight, bias, dout)
    elif workload.op == "index_select_cat":
        sources = [randn(batch, tokens, shape.dim, grad=True) for batch, tokens in shape.groups]
        dout = randn(shape.kept_elements)
        case = _select_cat_case(provider, workload, fn, sources, indices, dout)
    else:
        inplace = workload.op == "scaled_index_add_inplace"
        grad = not inplace
        xs = [randn(batch, tokens, shape.dim, grad=grad) for batch, tokens in shape.groups]
        sources = [
            randn(k, tokens, shape.dim, dtype=workload.branch, grad=grad)
            for k, (_, tokens) in zip(shape.kept, shape.groups)
        ]
        # LayerScale's gamma, far from 1e-5 so that the check sees the added term.
        gamma = (0.5 + torch.rand(shape.dim, generator=generator, device=device)).requires_grad_(
            grad
        )
        alphas = [batch / k for k, (batch, _) in zip(shape.kept, shape.groups)]
        douts = [randn(batch, tokens, shape.dim) for batch, tokens in shape.groups]
        make = _inplace_case if inplace else _index_add_case
        case = make(provider, workload, fn, xs, indices, sources, gamma, alphas, douts)
    case.fwd()
    return case


def _select_cat_case(provider, workload, fn, sources, indices, dout) -> Case:
    def fwd():
        return fn(sources, indices)

    def fwd_bwd():
        return torch.autograd.grad(fwd(), sources, dout)

    def check():
        out = fwd()
        grads = fwd_bwd()
        ref = torch.cat([s.detach().double()[i].flatten() for s, i in zip(sources, indices)])
        ref_grads, offset = [], 0
        for source, index in zip(sources, indices):
            size = index.shape[0] * source[0].numel()
            part = dout[offset : offset + size].double().view(index.shape[0], *source.shape[1:])
            ref_grads.append(
                source.new_zeros(source.shape, dtype=torch.float64).index_copy_(0, index, part)
            )
            offset += size
        return _max_error([out], [ref]), _max_error(grads, ref_grads), None

    return Case(provider, workload, fwd, fwd_bwd, check)


def _layer_norm_case(provider, workload, fn, sources, indices, weight, bias, dout) -> Case:
    leaves = [*sources, weight, bias]
    device_type = sources[0].device.type

    def fwd():
        with torch.autocast(device_type, dtype=workload.branch):
            return fn(sources, indices, weight, bias)

    def fwd_bwd():
        return torch.autograd.grad(fwd(), leaves, dout.to(fwd().dtype))

    def check():
        out = fwd()
        grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
        ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
        dim = sources[0].shape[-1]
        gathered = torch.cat(
            [s[i].reshape(-1, dim) for s, i in zip(ref_leaves[: len(sources)], indices)]
        )
        ref = F.layer_norm(gathered, (dim,), ref_leaves[-2], ref_leaves[-1], LAYER_NORM_EPS)
        ref_grads = torch.autograd.grad(ref, ref_leaves, dout.to(out.dtype).double())
        return (
            _max_error([out], [ref]),
            _max_error(grads[:-2], ref_grads[:-2]),
            _max_error(grads[-2:], ref_grads[-2:]),
        )

    return Case(provider, workload, fwd, fwd_bwd, check)


def _index_add_case(provider, workload, fn, xs, indices, sources, gamma, alphas, douts) -> Case:
    leaves = [*xs, *sources, gamma]

    def fwd():
        return [fn(x, i, s, gamma, a) for x, i, s, a in zip(xs, indices, sources, alphas)]

    def fwd_bwd():
        return torch.autograd.grad(fwd(), leaves, douts)

    def check():
        outs = fwd()
        grads = fwd_bwd()
        ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
        groups = len(xs)
        ref_xs, ref_sources, ref_gamma = (
            ref_leaves[:groups],
            ref_leaves[groups : 2 * groups],
            ref_leaves[-1],
        )
        refs = [
            torch.index_add(x, 0, i, s * ref_gamma, alpha=a)
            for x, i, s, a in zip(ref_xs, indices, ref_sources, alphas)
        ]
        ref_grads = torch.autograd.grad(refs, ref_leaves, [d.double() for d in douts])
        return (
            _max_error(outs, refs),
            _max_error(grads[:-1], ref_grads[:-1]),
            _max_error(grads[-1:], ref_grads[-1:]),
        )

    return Case(provider, workload, fwd, fwd_bwd, check)


def _inplace_case(provider, workload, fn, xs, indices, sources, gamma, alphas, douts) -> Case:
    def fwd():
        for x, i, s, a in zip(xs, indices, sources, alphas):
            fn(x, i, s, gamma, a)

    def check():
        before = [x.clone() for x in xs]
        fwd()
        refs = [
            x.double().index_add(0, i, s.double() * gamma.double(), alpha=a)
            for x, i, s, a in zip(before, indices, sources, alphas)
        ]
        return _max_error(xs, refs), None, None

    return Case(provider, workload, fwd, None, check)


def check_case(case: Case) -> tuple[float, float | None, float | None]:
    """The errors of ``case`` against float64 on its own inputs (see :class:`Case`)."""
    with torch.no_grad() if case.fwd_bwd is None else torch.enable_grad():
        return case.check()


# --- running -------------------------------------------------------------------------------------


def parse_shapes(text: str) -> list[Shape]:
    """``"64x257x1024+256x50x1024"`` -> ``[STEP]``: items of crop groups ``BxNxC`` joined by "+"
    (one call covers all groups of an item), comma-separated; ValueError if malformed."""
    shapes = []
    for item in common.split_shapes(text):
        groups, dim = common.parse_groups(item, "stochastic-depth", "64x257x1024+256x50x1024")
        shapes.append(Shape(groups, dim))
    return shapes


def _record(
    provider: Provider, workload: Workload, pass_: str, status: str, dtype: torch.dtype, **fields
) -> Record:
    shape = workload.shape
    defaults = {
        "op": workload.op,
        "groups": [list(group) for group in shape.groups],
        "dim": shape.dim,
        "kept": list(shape.kept),
        "drop_rate": DROP_RATE,
        "stream_dtype": dtype_name(workload.stream),
        "branch_dtype": dtype_name(workload.branch),
        "backend": None,
        "bytes": must_move_bytes(workload, pass_),
        "GBps": None,
        "copy_fraction": None,
        "graph_ms": None,
        "baseline": "torch",
        "grad_rel_err": None,
        "param_rel_err": None,
    }
    return common.new_record(
        "stochastic-depth", provider, pass_, shape.name, status, dtype, {**defaults, **fields}
    )


def _tolerance(workload: Workload) -> float:
    return max(TOLERANCE.get(workload.stream, 0.0), TOLERANCE.get(workload.branch, 0.0))


def _measure(context: BenchContext, provider: Provider, workload: Workload) -> list[Record]:
    """Every pass of one provider for one workload (see ``common.measure_passes``)."""

    def body() -> Iterator[Record]:  # run by measure_passes: make_case's errors are caught there
        case = make_case(provider, workload, device=context.device)
        out_error, grad_error, param_error = check_case(case)
        tolerance = _tolerance(workload)
        backend = None
        if provider.backend is not None:
            backend = _resolved_backend(workload, provider.backend, context.device)
        for pass_ in workload.passes:
            backward = pass_ == "fwd+bwd"
            error = max(out_error, grad_error or 0.0) if backward else out_error
            param = param_error if backward else None
            good = common.within(error, tolerance) and (
                param is None or common.within(param, PARAM_TOLERANCE_FACTOR * tolerance)
            )
            context.say(f"stochastic-depth {workload.name} {pass_:<7} {provider.name}")
            ms, graph_ms, host_ms, note = common.time_call_graphed(context, case.timed(pass_))
            nbytes = must_move_bytes(workload, pass_)
            gbps = nbytes / ((graph_ms or ms) * 1e-3) / 1e9
            yield _record(
                provider,
                workload,
                pass_,
                "ok",
                context.dtype,
                backend=backend,
                ms=ms,
                graph_ms=graph_ms,
                GBps=gbps,
                copy_fraction=gbps / context.copy_gbps if context.copy_gbps > 0 else None,
                max_rel_err=error,
                grad_rel_err=grad_error if backward else None,
                param_rel_err=param,
                check="ok" if good else "MISMATCH",
                host_ms=host_ms,
                note=note,
            )

    return common.measure_passes(
        context, provider, workload, body(), _record, passes=workload.passes
    )


def _resolved_backend(workload: Workload, backend: str, device: torch.device) -> str:
    """The backend ``backend`` stands for in the workload's calls, as the op resolves it (by the
    shape class of each call: one call for the gathers, one per crop group for the adds);
    "a/b" when the calls differ."""
    op, shape = _BACKEND_OP[workload.op], workload.shape
    if op == "scaled_index_add":
        classes = [
            backend_table.shape_class(
                op,
                width=shape.dim,
                rows=batch * tokens,
                dtype=workload.stream,
                source_dtype=workload.branch,
            )
            for batch, tokens in shape.groups
        ]
    else:
        sizes = {"width": shape.dim, "rows": shape.kept_elements // shape.dim}
        if op == "index_select_layer_norm":  # under autocast to the branch's dtype
            sizes["out_dtype"] = workload.branch
        classes = [backend_table.shape_class(op, dtype=workload.stream, **sizes)]
    return "/".join(dict.fromkeys(_backend.resolve(op, backend, device, c) for c in classes))


def _add_speedups(records: list[Record]) -> None:
    """Against torch eager at the same pass: graph times when both have one, else eager times."""
    base = {r["pass"]: r for r in records if r["provider"] == "torch" and r["status"] == "ok"}
    for record in records:
        baseline = base.get(record["pass"])
        if record["status"] != "ok" or baseline is None:
            continue
        if record["graph_ms"] and baseline["graph_ms"]:
            record["speedup"] = baseline["graph_ms"] / record["graph_ms"]
        else:
            record["speedup"] = baseline["ms"] / record["ms"]


def run(
    context: BenchContext, shapes: Sequence[Shape] | None = None
) -> tuple[list[Record], list[str]]:
    """Time every provider for every workload. Returns (records, notes)."""
    shapes, notes = common.choose_shapes(
        context,
        shapes,
        full=SHAPES,
        quick=QUICK_SHAPES,
        cpu=[shape.scaled_down(CPU_BATCH_DIVISOR) for shape in SHAPES],
        cpu_scaling=f"B/{CPU_BATCH_DIVISOR}, rounded up",
        gpu_kernels=["ours (backend='auto')"]
        + [provider.name for provider in PROVIDERS if provider.gpu_kernel],
    )
    if context.device.type != "cuda":
        notes.append(
            "ours ran backend='auto', which on the CPU is the torch reference of the ops, not the "
            "Triton kernels; no CUDA-graph times without a GPU"
        )
    records = common.run_providers(
        context,
        workloads(shapes, context.dtype),
        PROVIDERS,
        status=provider_status,
        measure=_measure,
        record=_record,
        finish_shape=_add_speedups,
        passes=lambda workload: workload.passes,
    )
    return records, notes


# --- tables --------------------------------------------------------------------------------------


def _order(record: Record) -> tuple:
    """By op, shape, the fp32 stream first, pass."""
    stream = record["stream_dtype"] != "fp32"
    return OPS.index(record["op"]), record["shape"], stream, PASSES.index(record["pass"])


def _cells(record: Record) -> list[str]:
    return [
        record["op"],
        record["shape"],
        record["stream_dtype"],
        record["pass"],
        record["provider"],
        common.number(record["ms"], 4),
        common.number(record["graph_ms"], 4),
        common.number(record["GBps"], 0),
        common.percent(record["copy_fraction"]),
        common.speedup(record["speedup"]),
        common.error(record["max_rel_err"]),
        "MISMATCH" if record["check"] == "MISMATCH" else record["note"],
    ]


def table(records: Sequence[Record]) -> Table:
    """One row per timed provider x workload x pass; skipped providers are listed under it."""
    result = common.provider_table(
        f"Stochastic depth at drop rate {DROP_RATE} (median ms eager and CUDA-graph replay; GB/s of "
        "must-move bytes; copy = fraction of the copy bandwidth)",
        [
            "op",
            "shape",
            "stream",
            "pass",
            "provider",
            "ms",
            "graph ms",
            "GB/s",
            "copy",
            "vs torch",
            "err",
            "note",
        ],
        records,
        _cells,
        order=_order,
    )
    result.notes.append(
        "GB/s and copy from graph ms where the capture worked, else from ms; vs torch: torch "
        "eager's time over this one (graph times when both have one); stream: the residual "
        "stream's dtype (the branch has the --dtype, gamma fp32); err: max |out, grads - float64 "
        "ref| / max |ref|"
    )
    return result


def headline(records: Sequence[Record]) -> Table | None:
    """Ours (auto, and each backend timed by name) at the ViT-L step against 80% of the copy
    bandwidth, or None if not measured."""
    chosen = [
        r
        for r in records
        if r["provider"] in OURS
        and [tuple(group) for group in r["groups"]] == list(STEP.groups)
        and r["dim"] == STEP.dim
        and r["dtype"] == "bf16"
        and r["status"] in ("ok", "error")
    ]
    if not chosen:
        return None
    result = Table(
        f"Stochastic depth, ViT-L step ({STEP.name}, drop rate {DROP_RATE}) against TARGETS.md",
        [
            "op",
            "stream",
            "pass",
            "provider",
            "ms",
            "graph ms",
            "GB/s",
            "copy",
            "vs torch",
            "vs xformers",
            "target",
            "verdict",
        ],
    )
    others = {
        (r["op"], r["stream_dtype"], r["pass"], r["provider"]): r
        for r in records
        if r["status"] == "ok" and r["shape"] == STEP.name and r["dtype"] == "bf16"
    }
    for record in sorted(chosen, key=lambda r: (_order(r), OURS.index(r["provider"]))):
        verdict = ""
        if record["status"] == "error":
            verdict = f"error: {record['note']}"
        elif record["check"] == "MISMATCH":
            verdict = "MISMATCH: wrong results"
        elif record["copy_fraction"] is not None:
            verdict = common.verdict(
                record["copy_fraction"], TARGET_COPY_FRACTION, None, higher_is_better=True
            )
            if record["graph_ms"] is None:
                verdict += " (eager time: no CUDA graph)"
        xformers = others.get((record["op"], record["stream_dtype"], record["pass"], "xformers"))
        versus_xformers = None
        if xformers is not None and record["status"] == "ok":
            if record["graph_ms"] and xformers["graph_ms"]:
                versus_xformers = xformers["graph_ms"] / record["graph_ms"]
            else:
                versus_xformers = xformers["ms"] / record["ms"]
        result.rows.append(
            [
                record["op"],
                record["stream_dtype"],
                record["pass"],
                record["provider"],
                common.number(record["ms"], 4),
                common.number(record["graph_ms"], 4),
                common.number(record["GBps"], 0),
                common.percent(record["copy_fraction"]),
                common.speedup(record["speedup"]),
                common.speedup(versus_xformers),
                f">= {TARGET_COPY_FRACTION:.0%} of copy",
                verdict,
            ]
        )
    result.notes.append(
        "copy: GB/s of must-move bytes (from the CUDA-graph time) over the copy bandwidth "
        "measured in the same run; the target is TARGETS.md's, set on an H100 80GB HBM3"
    )
    return result


BENCHMARK = Benchmark(
    name="stochastic-depth",
    summary="index_select_cat and scaled_index_add (DINOv2's stochastic depth) in GB/s: ours "
    "(auto, triton, cuda) vs torch eager, torch.compile, xFormers; eager and CUDA-graph times",
    shapes_help="BxNxC[+BxNxC...],... crop groups of one C (e.g. 64x257x1024+256x50x1024)",
    parse_shapes=parse_shapes,
    run=run,
    table=table,
    headline=headline,
)
