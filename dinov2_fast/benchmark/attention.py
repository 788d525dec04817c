"""Attention benchmark: providers, shapes, the FLOP model, peak memory and result records.

Every provider computes non-causal ``softmax(scale · q kᵀ) v`` per batch element and head, with
``scale = D ** -0.5``, for self-attention (q, k and v of one shape). Two passes are timed:

- ``fwd``: the forward of a training step (inputs require grad, so what the backward needs is kept);
- ``fwd+bwd``: the forward, then dq, dk and dv from ``torch.autograd.grad`` (for a provider that
  takes one qkv tensor: its one gradient dqkv).

Shapes are ``B x N x H x D`` (batch, tokens, heads, head dim; :data:`SHAPES` are those of
TARGETS.md) plus the packed multi-crop step :data:`MULTI_CROP`: ViT-L's 64 global crops of 257
tokens and 256 local crops of 50 tokens. For it the providers with a variable-length call (ours,
flash-attn's varlen, xFormers' BlockDiagonalMask) make ONE call over the 29248 packed tokens; every
other provider makes one call per crop group, timed back to back as one function (the sum of the
two calls, as in TARGETS.md, up to one cache flush).

Providers (see :data:`PROVIDERS`), each with the layout it is given, built before timing:

- ``triton``: ours, ``attention_qkvpacked(qkv, backend="triton")`` on ``qkv: [B, N, 3, H, D]``, the
  layout a qkv Linear writes; packed: one call on ``[T, 3, H, D]`` with an int32 ``cu_seqlens``
  tensor (the op checks it on the host: one device sync a call, which the time includes);
- ``cuda``: the same calls with ``backend="cuda"`` (the compiled extension; fp16 and bf16 only),
  skipped with the reason where the extension is not built;
- ``triton-memeff``: ours through xFormers' signature, ``memory_efficient_attention(q, k, v)`` on
  separate ``[B, N, H, D]`` tensors; packed: ``[1, T, H, D]`` with a ``BlockDiagonalMask``
  (no sync: the mask's lengths are Python ints);
- ``sdpa-cudnn``, ``sdpa-flash``, ``sdpa-efficient``, ``sdpa-math``:
  ``F.scaled_dot_product_attention`` with one backend forced by ``sdpa_kernel``. SDPA is given
  contiguous ``[B, H, N, D]`` tensors, its best case: the transposes from ``[B, N, H, D]`` are made
  once before timing and are NOT in the timed region (a model would pay for them);
- ``naive``: ``softmax((q · scale) kᵀ) v`` with two matmuls on ``[B, H, N, D]``, as DINOv2's and
  iBOT's ``Attention`` do: the iBOT-style baseline, which stores the ``B·H·N²`` scores;
- ``flash-attn`` (``flash_attn_func``; packed: ``flash_attn_varlen_qkvpacked_func``) and
  ``xformers`` (``memory_efficient_attention``; packed: its ``BlockDiagonalMask``) when importable;
- ``torch.compile``: the naive function compiled (one compile per shape; on the CPU only with
  ``--compile``).

A provider that cannot run here is recorded as "skipped" (or "not timed" for GPU kernels on the
CPU) with the reason; so is a provider that stores the scores (naive, sdpa-math, torch.compile)
where they would take more than :data:`SCORES_LIMIT_BYTES`.

FLOP model (TARGETS.md): forward ``4·B·H·N²·D`` (two matmuls), forward+backward 3.5 times that;
the packed row sums its groups. TFLOP/s is these FLOPs over the median time. ``peak_MiB`` is the
most memory allocated during one call beyond what was allocated before it (``torch.cuda
.max_memory_allocated``; the inputs and dO are not counted, the outputs and gradients are), CUDA only.

Speedups are against ``sdpa-cudnn``, the fastest stock baseline in TARGETS.md (where it cannot run,
the first timed of ``sdpa-flash``, ``sdpa-efficient``, ``sdpa-math``; each record names its
baseline).

Each provider's output and dq, dk, dv are checked once against float64 on the same inputs, on a
subset that keeps float64 cheap: the first and last batch element of each crop group and the first
and last head (attention is independent per batch element and head, so the subset of a full-size
call is exact). ``err(t) = max |t - ref| / max |ref|``; ``max_rel_err`` is err(out) for ``fwd`` and
the largest of all four for ``fwd+bwd``, whose ``grad_rel_err`` is the largest of err(dq), err(dk),
err(dv). Over :data:`TOLERANCE` the record says ``"check": "MISMATCH"``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from dinov2_fast.benchmark import BenchContext, Benchmark, Record, Table, common
from dinov2_fast.benchmark.common import PASSES
from dinov2_fast.ops.attention import (
    CUDA_DTYPES,
    HEAD_DIMS,
    attention_qkvpacked,
    memory_efficient_attention,
)
from dinov2_fast.ops.block_diagonal_mask import BlockDiagonalMask

__all__ = [
    "BENCHMARK",
    "LONG",
    "LONG_D128",
    "MULTI_CROP",
    "PASSES",
    "PROVIDERS",
    "QUICK_SHAPES",
    "SHAPES",
    "TARGETS",
    "TOLERANCE",
    "VIT_G_GLOBAL",
    "VIT_L_518",
    "VIT_L_GLOBAL",
    "VIT_L_LOCAL",
    "Call",
    "Case",
    "Provider",
    "Shape",
    "Target",
    "check_case",
    "make_case",
    "naive_attention",
    "parse_shapes",
    "provider_status",
    "run",
]


@dataclass(frozen=True)
class Shape:
    """One benchmark shape: crop groups of ``(B, N)`` sharing ``H`` heads of width ``D``.

    A dense shape has one group; ``packed`` is the multi-crop step, where the providers with a
    variable-length call make one call over all groups' tokens.
    """

    groups: tuple[tuple[int, int], ...]
    heads: int
    head_dim: int
    packed: bool = False

    @property
    def name(self) -> str:
        crops = "+".join(f"{batch}x{tokens}" for batch, tokens in self.groups)
        if self.packed:
            crops = f"packed({crops})"
        return f"{crops}x{self.heads}x{self.head_dim}"

    @property
    def seqlens(self) -> list[int]:
        return [tokens for batch, tokens in self.groups for _ in range(batch)]

    @property
    def total_tokens(self) -> int:
        return sum(batch * tokens for batch, tokens in self.groups)

    @property
    def score_elements(self) -> int:
        """``B·H·N²`` summed over the groups: the scores a naive implementation stores."""
        return sum(batch * self.heads * tokens**2 for batch, tokens in self.groups)

    def flops(self, pass_: str) -> int:
        """The FLOP model: ``4·B·H·N²·D`` forward, 3.5 times that forward+backward."""
        forward = 4 * self.score_elements * self.head_dim
        if pass_ == "fwd":
            return forward
        if pass_ == "fwd+bwd":
            return forward * 7 // 2
        raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")

    def scaled_down(self, batch_divisor: int, head_divisor: int) -> Shape:
        groups = tuple((-(-batch // batch_divisor), tokens) for batch, tokens in self.groups)
        return replace(self, groups=groups, heads=-(-self.heads // head_divisor))


VIT_L_GLOBAL = Shape(((64, 257),), 16, 64)  # ViT-L, 32 images x 2 global crops (224 px)
VIT_L_LOCAL = Shape(((256, 50),), 16, 64)  # ViT-L, 32 images x 8 local crops (98 px)
MULTI_CROP = Shape(((64, 257), (256, 50)), 16, 64, packed=True)  # both, packed in one sequence
VIT_L_518 = Shape(((16, 1370),), 16, 64)  # ViT-L at 518 px
VIT_G_GLOBAL = Shape(((64, 257),), 24, 64)  # ViT-g global crops
LONG = Shape(((4, 4096),), 16, 64)
LONG_D128 = Shape(((4, 4096),), 16, 128)
SHAPES: tuple[Shape, ...] = (
    VIT_L_GLOBAL,
    VIT_L_LOCAL,
    MULTI_CROP,
    VIT_L_518,
    VIT_G_GLOBAL,
    LONG,
    LONG_D128,
)
QUICK_SHAPES: tuple[Shape, ...] = (
    Shape(((2, 65),), 2, 64),
    Shape(((2, 65), (4, 17)), 2, 64, packed=True),
)
# Without a GPU the default shapes run with B and H divided by these (rounded up).
CPU_BATCH_DIVISOR = 16
CPU_HEAD_DIVISOR = 8
# Providers that store the B·H·N² scores are skipped where they would take more than this.
SCORES_LIMIT_BYTES = 16 << 30
# max |out - ref| / max |ref| allowed for the output and for dq, dk, dv of each dtype: bf16 about
# 4 ulps, as the kernel tests allow (naive bf16 reaches ~1.4e-2: it rounds the scores to bf16
# before the softmax); fp32 allows for kernels that multiply in TF32 (Triton's default for fp32).
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 6e-3, torch.float32: 5e-3}
# The stock providers speedups are measured against, in order of preference.
BASELINES = ("sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-math")
# What SDPA's error says when the forced backend has no kernel for the inputs (CUDA, CPU).
NO_SDPA_KERNEL = ("No available kernel", "No viable backend")
# Layouts: q, k, v (and the output) as [B, H, N, D] or [B, N, H, D] per crop group, or all crops'
# tokens packed as [T, H, D] ("tokens") or [1, T, H, D] ("tokens1") for one varlen call.
LAYOUTS = {
    "bhnd": "[B, H, N, D]",
    "bnhd": "[B, N, H, D]",
    "tokens": "[T, H, D]",
    "tokens1": "[1, T, H, D]",
}


# --- providers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """What a provider's call is built for: the shape, the softmax scale and the device."""

    shape: Shape
    scale: float
    device: torch.device

    def mask(self) -> BlockDiagonalMask:
        return BlockDiagonalMask(self.shape.seqlens)


AttentionFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Call:
    """How a provider is called: its inputs' layout (a key of :data:`LAYOUTS`), whether q, k and v
    are stacked in one tensor (dim -3: ``[..., 3, H, D]``), and ``build(setup) -> fn``, where
    ``fn(*inputs)`` returns the output in the same layout."""

    layout: str
    stacked: bool
    build: Callable[[Setup], AttentionFn]

    @property
    def one_call(self) -> bool:
        """One call over all crop groups (a packed layout) rather than one call per group."""
        return self.layout in ("tokens", "tokens1")

    def describe(self) -> str:
        one = LAYOUTS[self.layout]
        return f"qkv {one.replace('H, D', '3, H, D')}" if self.stacked else f"q, k, v {one}"


@dataclass(frozen=True)
class Provider:
    """One implementation to time.

    Attributes:
        name: its name in tables and results.
        description: one line on what it runs.
        dense: how it is called at a dense shape, and per crop group at a packed one ...
        packed: ... unless this is set: its one call over the packed tokens.
        gpu_kernel: a GPU kernel; never timed on the CPU.
        backend: our op's backend, when its availability decides.
        library: import name of an optional library it needs.
        compiles: uses torch.compile (on the CPU only when asked for: compiling is slow there).
        sdpa: the ``SDPBackend`` member it forces.
        scores: it stores the ``B·H·N²`` scores: "input" in the inputs' dtype, "fp32" in float32.
    """

    name: str
    description: str
    dense: Call
    packed: Call | None = None
    gpu_kernel: bool = False
    backend: str | None = None
    library: str | None = None
    compiles: bool = False
    sdpa: str | None = None
    scores: str | None = None

    def call(self, shape: Shape) -> Call:
        return self.packed if shape.packed and self.packed is not None else self.dense


def _ours_qkvpacked(backend: str) -> Callable[[Setup], AttentionFn]:
    def build(setup: Setup) -> AttentionFn:
        return lambda qkv: attention_qkvpacked(qkv, scale=setup.scale, backend=backend)

    return build


def _ours_varlen(backend: str) -> Callable[[Setup], AttentionFn]:
    def build(setup: Setup) -> AttentionFn:
        cu_seqlens = setup.mask().cu_seqlens(setup.device)
        longest = max(setup.shape.seqlens)
        return lambda qkv: attention_qkvpacked(
            qkv, scale=setup.scale, cu_seqlens=cu_seqlens, max_seqlen=longest, backend=backend
        )

    return build


def _ours_memeff(setup: Setup) -> AttentionFn:
    return lambda q, k, v: memory_efficient_attention(q, k, v, scale=setup.scale, backend="triton")


def _ours_memeff_packed(setup: Setup) -> AttentionFn:
    mask = setup.mask()
    return lambda q, k, v: memory_efficient_attention(
        q, k, v, attn_bias=mask, scale=setup.scale, backend="triton"
    )


def _sdpa(backend_name: str) -> Callable[[Setup], AttentionFn]:
    def build(setup: Setup) -> AttentionFn:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)

        def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, scale=setup.scale)

        return call

    return build


def naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """``softmax((q · scale) kᵀ) v`` over ``[B, H, N, D]``, as DINOv2's and iBOT's ``Attention``."""
    scores = (q * scale) @ k.transpose(-2, -1)
    return scores.softmax(dim=-1) @ v


def _naive(setup: Setup) -> AttentionFn:
    return lambda q, k, v: naive_attention(q, k, v, setup.scale)


def _compiled(setup: Setup) -> AttentionFn:
    # A fresh compile per shape: no recompile limit to hit, no shapes turned dynamic by a second call.
    torch._dynamo.reset()
    compiled = torch.compile(naive_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, setup.scale)


def _flash_attn(setup: Setup) -> AttentionFn:
    from flash_attn import flash_attn_func

    return lambda q, k, v: flash_attn_func(q, k, v, softmax_scale=setup.scale)


def _flash_attn_varlen(setup: Setup) -> AttentionFn:
    from flash_attn import flash_attn_varlen_qkvpacked_func

    cu_seqlens = setup.mask().cu_seqlens(setup.device)
    longest = max(setup.shape.seqlens)
    return lambda qkv: flash_attn_varlen_qkvpacked_func(
        qkv, cu_seqlens, longest, softmax_scale=setup.scale
    )


def _xformers(setup: Setup) -> AttentionFn:
    from xformers.ops import memory_efficient_attention as xformers_attention

    return lambda q, k, v: xformers_attention(q, k, v, scale=setup.scale)


def _xformers_packed(setup: Setup) -> AttentionFn:
    from xformers.ops import fmha
    from xformers.ops import memory_efficient_attention as xformers_attention

    bias = fmha.BlockDiagonalMask.from_seqlens(setup.shape.seqlens)
    return lambda q, k, v: xformers_attention(q, k, v, attn_bias=bias, scale=setup.scale)


def _sdpa_provider(name: str, backend_name: str, gpu_kernel: bool, **fields) -> Provider:
    return Provider(
        name,
        f"F.scaled_dot_product_attention under sdpa_kernel(SDPBackend.{backend_name}), "
        "contiguous [B, H, N, D] inputs (transposed before timing)",
        Call("bhnd", False, _sdpa(backend_name)),
        gpu_kernel=gpu_kernel,
        sdpa=backend_name,
        **fields,
    )


# In the order they run: ours and the stock baseline first, torch.compile (slow to build) last.
PROVIDERS: tuple[Provider, ...] = (
    Provider(
        "triton",
        "dinov2_fast.ops.attention_qkvpacked(backend='triton') on qkv [B, N, 3, H, D]; packed: "
        "one call on [T, 3, H, D] with cu_seqlens",
        Call("bnhd", True, _ours_qkvpacked("triton")),
        Call("tokens", True, _ours_varlen("triton")),
        gpu_kernel=True,
        backend="triton",
    ),
    Provider(
        "cuda",
        "dinov2_fast.ops.attention_qkvpacked(backend='cuda') (the compiled extension) on qkv "
        "[B, N, 3, H, D]; packed: one call on [T, 3, H, D] with cu_seqlens",
        Call("bnhd", True, _ours_qkvpacked("cuda")),
        Call("tokens", True, _ours_varlen("cuda")),
        gpu_kernel=True,
        backend="cuda",
    ),
    Provider(
        "triton-memeff",
        "dinov2_fast.ops.memory_efficient_attention(backend='triton') on q, k, v [B, N, H, D]; "
        "packed: [1, T, H, D] with a BlockDiagonalMask",
        Call("bnhd", False, _ours_memeff),
        Call("tokens1", False, _ours_memeff_packed),
        gpu_kernel=True,
        backend="triton",
    ),
    _sdpa_provider("sdpa-cudnn", "CUDNN_ATTENTION", True),
    _sdpa_provider("sdpa-flash", "FLASH_ATTENTION", True),
    _sdpa_provider("sdpa-efficient", "EFFICIENT_ATTENTION", True),
    Provider(
        "naive",
        "softmax((q * scale) @ k^T) @ v in torch on [B, H, N, D] (the iBOT-style baseline)",
        Call("bhnd", False, _naive),
        scores="input",
    ),
    _sdpa_provider("sdpa-math", "MATH", False, scores="fp32"),
    Provider(
        "flash-attn",
        "flash_attn_func on [B, N, H, D]; packed: flash_attn_varlen_qkvpacked_func on [T, 3, H, D]",
        Call("bnhd", False, _flash_attn),
        Call("tokens", True, _flash_attn_varlen),
        gpu_kernel=True,
        library="flash_attn",
    ),
    Provider(
        "xformers",
        "xformers.ops.memory_efficient_attention on [B, N, H, D]; packed: [1, T, H, D] with its "
        "BlockDiagonalMask",
        Call("bnhd", False, _xformers),
        Call("tokens1", False, _xformers_packed),
        gpu_kernel=True,
        library="xformers",
    ),
    Provider(
        "torch.compile",
        "torch.compile of the naive attention, one compile per shape",
        Call("bhnd", False, _compiled),
        compiles=True,
        scores="input",
    ),
)
_BY_NAME = {provider.name: provider for provider in PROVIDERS}


def provider_status(
    provider: Provider,
    device: torch.device,
    dtype: torch.dtype,
    shape: Shape | None = None,
    *,
    compile_on_cpu: bool = False,
) -> tuple[str, str]:
    """``("ok", "")`` when ``provider`` can be timed (at ``shape``, when given), else
    ``("skipped" | "not timed", why)``. Some limits of SDPA's backends show only when they run:
    :func:`make_case` raises :class:`common.Unavailable` for those."""
    if provider.sdpa is not None:
        from torch.nn.attention import SDPBackend

        if not hasattr(SDPBackend, provider.sdpa):
            return "skipped", f"this torch has no SDPBackend.{provider.sdpa}"
    status = common.availability(provider, device, compile_on_cpu=compile_on_cpu, op="attention")
    if status[0] != "ok":
        return status
    if provider.backend == "cuda" and dtype not in CUDA_DTYPES:
        return "skipped", "the CUDA attention kernels take fp16 and bf16"
    flash = provider.sdpa == "FLASH_ATTENTION" or provider.library == "flash_attn"
    if device.type == "cuda" and (flash or provider.sdpa == "CUDNN_ATTENTION"):
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return "skipped", f"needs compute capability 8.0 or newer, this GPU has {major}.{minor}"
        if flash and dtype not in (torch.float16, torch.bfloat16):
            return "skipped", "flash attention needs fp16 or bf16"
    if shape is not None:
        if provider.backend is not None and shape.head_dim not in HEAD_DIMS:
            return "skipped", (
                f"our kernels take head dims {', '.join(map(str, HEAD_DIMS))}, not {shape.head_dim}"
            )
        if provider.scores is not None:
            size = 4 if provider.scores == "fp32" else common.itemsize(dtype)
            nbytes = shape.score_elements * size
            if nbytes > SCORES_LIMIT_BYTES:
                return "skipped", (
                    f"its B·H·N² scores would take {nbytes / 2**30:.1f} GiB "
                    f"(limit {SCORES_LIMIT_BYTES / 2**30:.0f} GiB)"
                )
    return "ok", ""


# --- one case: a provider's inputs at one shape --------------------------------------------------


def _to_layout(layout: str, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per crop group ``[B, N, ...]`` tensors -> the tensor of each call in ``layout``."""
    if layout == "bhnd":
        return [t.transpose(1, 2).contiguous() for t in tensors]
    if layout == "bnhd":
        return [t.contiguous() for t in tensors]
    packed = torch.cat([t.flatten(0, 1) for t in tensors])
    return [packed if layout == "tokens" else packed.unsqueeze(0)]


def _from_layout(layout: str, tensors: Sequence[torch.Tensor], shape: Shape) -> list[torch.Tensor]:
    """The inverse of :func:`_to_layout` (views): each call's tensor -> per group ``[B, N, ...]``."""
    if layout == "bhnd":
        return [t.transpose(1, 2) for t in tensors]
    if layout == "bnhd":
        return list(tensors)
    (packed,) = tensors
    if layout == "tokens1":
        packed = packed[0]
    sizes = [batch * tokens for batch, tokens in shape.groups]
    return [part.unflatten(0, group) for part, group in zip(packed.split(sizes), shape.groups)]


@dataclass
class Case:
    """A provider ready to run at one shape.

    ``inputs`` holds each crop group's ``(q, k, v, dO)`` as ``[B, N, H, D]`` in the benchmark's
    dtype (the same values for every provider); ``leaves`` and ``douts`` are the provider's own
    copies, one list of inputs (and one dO) per call.
    """

    provider: Provider
    shape: Shape
    call: Call
    fn: AttentionFn
    scale: float
    inputs: list[tuple[torch.Tensor, ...]]
    leaves: list[list[torch.Tensor]]
    douts: list[torch.Tensor]
    all_leaves: list[torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.all_leaves = [t for call_inputs in self.leaves for t in call_inputs]

    def fwd(self) -> list[torch.Tensor]:
        return [self.fn(*call_inputs) for call_inputs in self.leaves]

    def fwd_bwd(self) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(self.fwd(), self.all_leaves, self.douts)

    def outputs_by_group(self, outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The outputs of :meth:`fwd` as one ``[B, N, H, D]`` tensor per crop group."""
        return _from_layout(self.call.layout, outputs, self.shape)

    def grads_by_group(self, grads: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
        """The gradients of :meth:`fwd_bwd` as ``(dq, dk, dv)``, each ``[B, N, H, D]``, per group."""
        layout = self.call.layout
        if self.call.stacked:
            return [dqkv.unbind(2) for dqkv in _from_layout(layout, grads, self.shape)]
        per_input = [_from_layout(layout, grads[i::3], self.shape) for i in range(3)]
        return list(zip(*per_input))


def make_case(
    provider: Provider,
    shape: Shape,
    *,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
) -> Case:
    """Random inputs for ``provider`` at ``shape`` in its layout, built and called once forward
    (which compiles what needs compiling). The same ``seed`` gives every provider the same values.

    Raises :class:`common.Unavailable` when SDPA finds no kernel of the forced backend for it.
    """
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*size: int) -> torch.Tensor:
        values = torch.randn(*size, generator=generator, device=device, dtype=torch.float32)
        return values.to(dtype)

    heads, dim = shape.heads, shape.head_dim
    inputs = [
        tuple(randn(batch, tokens, heads, dim) for _ in range(4)) for batch, tokens in shape.groups
    ]
    call = provider.call(shape)
    scale = dim**-0.5
    fn = call.build(Setup(shape, scale, device))
    if call.stacked:
        stacked = [torch.stack(group[:3], dim=2) for group in inputs]
        leaves = [[t.requires_grad_()] for t in _to_layout(call.layout, stacked)]
    else:
        per_input = [_to_layout(call.layout, [group[i] for group in inputs]) for i in range(3)]
        leaves = [[t.detach().requires_grad_() for t in one] for one in zip(*per_input)]
    douts = _to_layout(call.layout, [group[3] for group in inputs])
    case = Case(provider, shape, call, fn, scale, inputs, leaves, douts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            case.fwd()
        except RuntimeError as error:
            if not any(words in str(error) for words in NO_SDPA_KERNEL):
                raise
            raise common.Unavailable(_sdpa_reason(provider, caught)) from error
    return case


def _sdpa_reason(provider: Provider, caught: Sequence[warnings.WarningMessage]) -> str:
    """Why SDPA found no kernel, from the warnings it gave (the lines that are not headings)."""
    texts = (re.sub(r"\s*\(Triggered internally at [^)]*\)\.?", "", str(w.message)) for w in caught)
    lines = [
        line.strip()
        for text in texts
        for line in text.splitlines()
        if line.strip() and not line.strip().endswith("because:")
    ]
    why = "; ".join(dict.fromkeys(lines)) or "torch gave no reason"
    why = f"SDPBackend.{provider.sdpa} has no kernel for these inputs: {why}"
    return why if len(why) <= 300 else why[:297] + "..."


def _check_index(size: int, device: torch.device) -> torch.Tensor:
    """The first and the last index of a dimension of ``size``."""
    return torch.tensor(sorted({0, size - 1}), device=device)


def _subset(t: torch.Tensor, batch: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """The check subset of a ``[B, N, H, D]`` tensor: those batch elements and heads."""
    return t.detach()[batch][:, :, heads]


def _reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, scale: float
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """float64 output and (dq, dk, dv) of ``[B, N, H, D]`` inputs."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    with torch.enable_grad():
        scores = torch.einsum("bnhd,bmhd->bhnm", leaves[0], leaves[1]) * scale
        out = torch.einsum("bhnm,bmhd->bnhd", scores.softmax(-1), leaves[2])
        grads = torch.autograd.grad(out, leaves, dout.double())
    return out.detach(), grads


def check_case(case: Case) -> tuple[float, float]:
    """The errors of ``case`` against float64 on its own inputs, on the check subset (see the
    module docstring): ``(err(out), max(err(dq), err(dk), err(dv)))``."""
    outputs = case.outputs_by_group([out.detach() for out in case.fwd()])
    grads = case.grads_by_group(case.fwd_bwd())
    out_error = grad_error = 0.0
    for (q, k, v, dout), out, group_grads in zip(case.inputs, outputs, grads):
        index = (_check_index(q.shape[0], q.device), _check_index(q.shape[2], q.device))
        ref_out, ref_grads = _reference(*(_subset(t, *index) for t in (q, k, v, dout)), case.scale)
        out_error = max(out_error, common.relative_error(_subset(out, *index), ref_out))
        for grad, ref_grad in zip(group_grads, ref_grads):
            grad_error = max(grad_error, common.relative_error(_subset(grad, *index), ref_grad))
    return out_error, grad_error


# --- running -------------------------------------------------------------------------------------


def parse_shapes(text: str) -> list[Shape]:
    """``"64x257x16x64,packed"`` -> ``[Shape(((64, 257),), 16, 64), MULTI_CROP]``; ValueError if
    malformed."""
    shapes: list[Shape] = []
    for item in common.split_shapes(text):
        if item == "packed":
            shapes.append(MULTI_CROP)
            continue
        batch, tokens, heads, dim = common.parse_dims(
            item,
            "attention",
            ("B", "N", "H", "D"),
            "BxNxHxD or the word packed",
            "64x257x16x64,packed",
        )
        shapes.append(Shape(((batch, tokens),), heads, dim))
    return shapes


def _record(
    provider: Provider, shape: Shape, pass_: str, status: str, dtype: torch.dtype, **fields
) -> Record:
    call = provider.call(shape)
    dense = not shape.packed
    defaults = {
        "groups": [list(group) for group in shape.groups],
        "packed": shape.packed,
        "batch": shape.groups[0][0] if dense else None,
        "tokens": shape.groups[0][1] if dense else None,
        "heads": shape.heads,
        "head_dim": shape.head_dim,
        "total_tokens": shape.total_tokens,
        "layout": call.describe(),
        "calls": 1 if call.one_call else len(shape.groups),
        "flops": shape.flops(pass_),
        "TFLOPS": None,
        "peak_MiB": None,
        "grad_rel_err": None,
    }
    return common.new_record(
        "attention", provider, pass_, shape.name, status, dtype, {**defaults, **fields}
    )


def _measure(context: BenchContext, provider: Provider, shape: Shape) -> list[Record]:
    """Both passes of one provider at one shape (see ``common.measure_passes``)."""

    def body() -> Iterator[Record]:  # run by measure_passes: make_case's errors are caught there
        case = make_case(provider, shape, device=context.device, dtype=context.dtype)
        out_error, grad_error = check_case(case)
        tolerance = TOLERANCE.get(context.dtype, 0.0)
        for pass_, fn, error, grad_error_or_none in (
            ("fwd", case.fwd, out_error, None),
            ("fwd+bwd", case.fwd_bwd, max(out_error, grad_error), grad_error),
        ):
            context.say(f"attention {shape.name} {pass_:<7} {provider.name}")
            peak = common.peak_extra_bytes(context.device, fn)
            ms, host_ms, note = common.time_call(context, fn)
            flops = shape.flops(pass_)
            yield _record(
                provider,
                shape,
                pass_,
                "ok",
                context.dtype,
                ms=ms,
                TFLOPS=flops / (ms * 1e-3) / 1e12,
                peak_MiB=None if peak is None else peak / 2**20,
                max_rel_err=error,
                grad_rel_err=grad_error_or_none,
                check="ok" if common.within(error, tolerance) else "MISMATCH",
                host_ms=host_ms,
                note=note,
            )

    return common.measure_passes(context, provider, shape, body(), _record)


def _add_speedups(records: list[Record]) -> None:
    """Speedups against sdpa-cudnn, or the first timed of the other :data:`BASELINES`."""
    for pass_ in PASSES:
        timed = {r["provider"] for r in records if r["pass"] == pass_ and r["status"] == "ok"}
        baseline = next((name for name in BASELINES if name in timed), BASELINES[0])
        for record in records:
            if record["pass"] == pass_:
                record["baseline"] = baseline
    common.add_speedups(records)


def run(
    context: BenchContext, shapes: Sequence[Shape] | None = None
) -> tuple[list[Record], list[str]]:
    """Time every provider at every shape, both passes. Returns (records, notes)."""
    shapes, notes = common.choose_shapes(
        context,
        shapes,
        full=SHAPES,
        quick=QUICK_SHAPES,
        cpu=[shape.scaled_down(CPU_BATCH_DIVISOR, CPU_HEAD_DIVISOR) for shape in SHAPES],
        cpu_scaling=f"B/{CPU_BATCH_DIVISOR} and H/{CPU_HEAD_DIVISOR}, rounded up",
        gpu_kernels=[provider.name for provider in PROVIDERS if provider.gpu_kernel],
    )
    records = common.run_providers(
        context,
        shapes,
        PROVIDERS,
        status=provider_status,
        measure=_measure,
        record=_record,
        finish_shape=_add_speedups,
    )
    return records, notes


# --- tables --------------------------------------------------------------------------------------


def _cells(record: Record) -> list[str]:
    return [
        record["shape"],
        record["pass"],
        record["provider"],
        common.number(record["ms"], 4),
        common.number(record["TFLOPS"], 2),
        common.speedup(record["speedup"]),
        common.number(record["peak_MiB"], 0),
        common.error(record["max_rel_err"]),
        "MISMATCH" if record["check"] == "MISMATCH" else record["note"],
    ]


def table(records: Sequence[Record]) -> Table:
    """One row per timed provider x shape x pass; skipped providers are listed under the table."""
    result = common.provider_table(
        "Attention (median ms; TFLOP/s at 4·B·H·N²·D forward, 3.5x that forward+backward)",
        ["shape", "pass", "provider", "ms", "TFLOP/s", "vs base", "peak MiB", "err", "note"],
        records,
        _cells,
    )
    bases = sorted({r["baseline"] for r in records if r["speedup"] is not None})
    result.notes += [
        f"vs base: the time of {' / '.join(bases) or BASELINES[0]} over this one (sdpa-cudnn "
        "where it runs); peak MiB: memory allocated beyond the inputs during one call (CUDA); "
        "err: max |out, dq, dk, dv - float64 ref| / max |ref| on the first and last batch "
        "element and head",
        "SDPA and naive get contiguous [B, H, N, D] inputs, transposed before timing; packed(...) "
        "rows: triton, cuda, triton-memeff, flash-attn and xformers make one varlen call over all "
        "crops, the others one call per crop group, back to back",
    ]
    return result


@dataclass(frozen=True)
class Target:
    """A goal of TARGETS.md (H100 80GB HBM3, bf16) for our kernels at one shape and pass.

    ``metric`` is "ms" (at most) or "TFLOP/s" (at least); ``floor`` the number an issue set, where
    one did (else only the goal); ``cudnn_ms`` SDPA-cuDNN's time on that H100.
    """

    shape: Shape
    pass_: str
    metric: str
    goal: float
    floor: float | None
    cudnn_ms: float

    def describe(self) -> str:
        sign = "<=" if self.metric == "ms" else ">="
        floor = "" if self.floor is None else f", floor {self.floor:g}"
        return f"{sign} {self.goal:g} {self.metric}{floor}"


TARGETS: tuple[Target, ...] = (
    Target(VIT_L_GLOBAL, "fwd+bwd", "ms", 0.30, 0.47, 0.470),
    Target(VIT_L_LOCAL, "fwd+bwd", "ms", 0.12, None, 0.308),
    Target(MULTI_CROP, "fwd+bwd", "ms", 0.42, 0.60, 0.778),
    Target(VIT_L_518, "fwd+bwd", "ms", 1.00, None, 1.273),
    Target(VIT_G_GLOBAL, "fwd+bwd", "ms", 0.45, None, 0.678),
    Target(LONG, "fwd+bwd", "TFLOP/s", 400, 300, 2.228),
    Target(LONG_D128, "fwd+bwd", "TFLOP/s", 450, None, 3.698),
    Target(VIT_L_GLOBAL, "fwd", "ms", 0.075, None, 0.120),
    Target(VIT_L_LOCAL, "fwd", "ms", 0.030, None, 0.074),
    Target(LONG, "fwd", "ms", 0.55, None, 0.589),
)
# TARGETS.md: peak extra memory of forward+backward at the ViT-L global shape, MiB.
REFERENCE_PEAK_MIB = {"naive": 615, "sdpa-cudnn": 195}
# The rows of the headline: ours against their targets, and the stock baseline measured alongside.
HEADLINE_PROVIDERS = ("triton", "cuda", "triton-memeff", "sdpa-cudnn")


def _is_shape(record: Record, shape: Shape) -> bool:
    return (
        [tuple(group) for group in record["groups"]] == list(shape.groups)
        and record["heads"] == shape.heads
        and record["head_dim"] == shape.head_dim
        and record["packed"] == shape.packed
    )


def headline(records: Sequence[Record]) -> Table | None:
    """Our kernels against the bf16 targets of TARGETS.md, or None if none of them was measured."""
    result = Table(
        "Attention bf16 against TARGETS.md",
        [
            "shape",
            "pass",
            "provider",
            "ms",
            "TFLOP/s",
            "vs cuDNN",
            "peak MiB",
            "cuDNN H100",
            "target",
            "verdict",
        ],
    )
    for target in TARGETS:
        for name in HEADLINE_PROVIDERS:
            found = [
                r
                for r in records
                if r["provider"] == name
                and r["pass"] == target.pass_
                and r["dtype"] == "bf16"
                and r["status"] in ("ok", "error")
                and _is_shape(r, target.shape)
            ]
            if not found:
                continue
            record = found[0]
            ours = _BY_NAME[name].backend is not None
            goal = verdict = ""
            if ours:
                goal = target.describe()
                if record["status"] == "error":
                    verdict = f"error: {record['note']}"
                elif record["check"] == "MISMATCH":
                    verdict = "MISMATCH: wrong results"
                else:
                    value = record["ms"] if target.metric == "ms" else record["TFLOPS"]
                    verdict = common.verdict(
                        value, target.goal, target.floor, higher_is_better=target.metric != "ms"
                    )
            result.rows.append(
                [
                    record["shape"],
                    record["pass"],
                    name,
                    common.number(record["ms"], 4),
                    common.number(record["TFLOPS"], 1),
                    common.speedup(record["speedup"]),
                    common.number(record["peak_MiB"], 0),
                    f"{target.cudnn_ms:g}",
                    goal,
                    verdict,
                ]
            )
    if not result.rows:
        return None
    result.notes.append(
        "TARGETS.md (H100 80GB HBM3, torch 2.11): peak extra memory of fwd+bwd at 64x257x16x64: "
        + ", ".join(f"{name} {mib} MiB" for name, mib in REFERENCE_PEAK_MIB.items())
        + "; the targets are set for that card. triton's and cuda's packed calls check "
        "cu_seqlens on the host (a sync each call); triton-memeff's BlockDiagonalMask does not"
    )
    return result


BENCHMARK = Benchmark(
    name="attention",
    summary="attention forward and forward+backward: ours (triton, cuda) vs SDPA (cuDNN, flash, "
    "efficient, math), naive, torch.compile, flash-attn, xFormers",
    shapes_help="BxNxHxD,... and the word packed (e.g. 64x257x16x64,packed)",
    parse_shapes=parse_shapes,
    run=run,
    table=table,
    headline=headline,
)
