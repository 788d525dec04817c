"""Block benchmark: one ViT-L block training step at drop rates 0 to 0.4, time and memory.

A step is the forward of one block on a residual stream that requires grad, under
``torch.autocast(--dtype)`` (bf16 by default; fp32 runs without autocast), then
``torch.autograd.grad`` of the output (against a fixed random dO) for the input and every parameter.
The block is ViT-L's: ``dim=1024, num_heads=16, mlp_ratio=4, qkv_bias=True, init_values=1e-5``,
fp32 parameters, an fp32 input. Two inputs (:data:`SHAPES`):

- ``batch``: one tensor ``[64, 257, 1024]`` (32 images x 2 global crops);
- ``multi-crop``: the list ``[[64, 257, 1024], [256, 50, 1024]]`` (the global and the 8 local crops
  of 32 images).

Drop rates :data:`DROP_RATES`: 0, 0.1, 0.3, 0.4 (measured in the order 0, 0.4, 0.1, 0.3, so that a
run cut short by ``--time-limit`` still has the headline's two).

Providers (see :data:`PROVIDERS`), all with the same weights (ours' state_dict, loaded into the
others: the keys are DINOv2's ``norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2,
ls2.gamma``):

- ``ours``: ``dinov2_fast.nn.Block`` (fused LayerNorm, our attention, backend "auto"); the list goes
  through its packed path in ONE call. In training with ``p > 0.1`` each branch runs on a random
  subset of ``max(int(B·(1-p)), 1)`` samples (DINOv2's efficient stochastic depth); at ``p <= 0.1``
  a tensor input takes the per-sample mask, a list the subset (as DINOv2's NestedTensorBlock does);
- ``torch``: stock PyTorch, :class:`StockBlock`: ``nn.LayerNorm`` (eps 1e-6), a qkv ``Linear``,
  ``F.scaled_dot_product_attention``, proj, LayerScale, timm's per-sample mask drop path
  (``x + drop_path(ls(branch))``) at every ``p > 0``, an Mlp with GELU; the list runs one forward
  per crop group;
- ``torch.compile``: ``torch.compile(StockBlock, dynamic=False)``, one compiled module for the whole
  run; the drop rate is a tensor buffer, so the rates ``p > 0`` share one graph per input shape.

Reported per provider, input and drop rate: ``ms`` (median ``do_bench`` of eager steps, what a
training loop sees), ``graph_ms`` (the step captured once in a CUDA graph and replayed: the GPU's
time without launch overhead; CUDA only, and where the capture fails the note says why),
``peak_MiB`` (the most memory allocated during one step beyond what was allocated before it, i.e.
above the inputs, dO and weights; outputs and gradients counted; CUDA only), and against the same
provider and input at ``p = 0``: ``time_ratio``, ``graph_time_ratio`` and ``memory_ratio``. The
target (TARGETS.md, "Stochastic depth"): at ``p = 0.4`` ours costs at most 0.7x the time and the
memory of its step at ``p = 0``. ``speedup``: the torch provider's ``ms`` over this one at the same
input and drop rate.

Correctness: once per provider and input, the block's output in eval mode (no drop path, so ``p``
does not matter) is compared with a float64 stock block on the first and last sample of each crop
group, with LayerScale's gammas set to values near 1 for the check (at 1e-5 the branches would
vanish in the output): ``max_rel_err`` is ``max |Δ - Δref| / max |Δref|`` with ``Δ = out - x`` what
the block adds to the stream; over :data:`TOLERANCE` the records say ``"check": "MISMATCH"``. The
compiled module is checked in training mode at ``p = 0`` (the same function, without a recompile for
eval mode).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dinov2_fast.benchmark import BenchContext, Benchmark, Record, Table, common
from dinov2_fast.nn.attention import MemEffAttention
from dinov2_fast.nn.block import Block
from dinov2_fast.nn.layer_norm import LayerNorm

__all__ = [
    "BATCH",
    "BENCHMARK",
    "DROP_RATES",
    "MULTI_CROP",
    "PROVIDERS",
    "QUICK_SHAPES",
    "SHAPES",
    "Models",
    "Provider",
    "Shape",
    "StockBlock",
    "drop_path_kind",
    "make_inputs",
    "make_step",
    "parse_shapes",
    "provider_status",
    "run",
]

DROP_RATES = (0.0, 0.1, 0.3, 0.4)
# The order they are measured in: the headline's two first.
MEASURE_ORDER = (0.0, 0.4, 0.1, 0.3)
HEADLINE_RATE = 0.4
TARGET_RATIO = 0.7
HEAD_DIM = 64
MLP_RATIO = 4.0
INIT_VALUES = 1e-5
EPS = 1e-6
# max |Δ - Δref| / max |Δref| per autocast dtype (fp32: our attention kernels multiply in TF32).
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 5e-3}
# A torch.compile of the block's forward and backward is not started with less time than this left
# before --time-limit's deadline (it takes tens of seconds and cannot be interrupted).
COMPILE_RESERVE_S = 60.0
OUT_OF_TIME_COMPILE = f"out of time (--time-limit): a compile needs ~{COMPILE_RESERVE_S:.0f} s"


# --- shapes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """The block's input: one crop group ``(B, N)`` is a tensor ``[B, N, C]``, several are the list
    of the multi-crop step. Heads of width :data:`HEAD_DIM`."""

    groups: tuple[tuple[int, int], ...]
    dim: int

    @property
    def name(self) -> str:
        return "+".join(f"{batch}x{tokens}x{self.dim}" for batch, tokens in self.groups)

    @property
    def multi_crop(self) -> bool:
        return len(self.groups) > 1

    @property
    def input(self) -> str:
        return "multi-crop" if self.multi_crop else "batch"

    @property
    def heads(self) -> int:
        return self.dim // HEAD_DIM

    @property
    def tokens(self) -> int:
        return sum(batch * tokens for batch, tokens in self.groups)

    def scaled_down(self, batch_divisor: int, dim: int) -> Shape:
        groups = tuple((-(-batch // batch_divisor), tokens) for batch, tokens in self.groups)
        return replace(self, groups=groups, dim=dim)


BATCH = Shape(((64, 257),), 1024)
MULTI_CROP = Shape(((64, 257), (256, 50)), 1024)
SHAPES: tuple[Shape, ...] = (BATCH, MULTI_CROP)
QUICK_SHAPES: tuple[Shape, ...] = (Shape(((4, 17),), 64), Shape(((4, 17), (8, 5)), 64))
# Without a GPU the default shapes run with B divided by this (rounded up) and C = CPU_DIM.
CPU_BATCH_DIVISOR = 16
CPU_DIM = 256


# --- the stock block -----------------------------------------------------------------------------


class _StockAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, channels // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, D]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, channels))


class _StockLayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_values))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _MaskDropPath(nn.Module):
    """timm's ``drop_path``: whole samples zeroed with probability p, the others scaled by
    ``1 / (1 - p)``. The rate is a tensor buffer (not in the state_dict) and ``active`` a bool, so
    that torch.compile makes one graph for every ``p > 0`` instead of one per rate."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.register_buffer("keep_prob", torch.ones(()), persistent=False)

    def set_drop_rate(self, rate: float) -> None:
        self.active = rate > 0.0
        self.keep_prob.fill_(1.0 - rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.active):
            return x
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(self.keep_prob)
        return x * mask.div_(self.keep_prob)


class _StockMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class StockBlock(nn.Module):
    """A ViT block in stock PyTorch with DINOv2's state_dict keys: ``x + drop_path(ls1(attn(
    norm1(x))))``, then the same with ``mlp`` and ``norm2``; drop path by a per-sample mask."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = MLP_RATIO,
        qkv_bias: bool = True,
        init_values: float = INIT_VALUES,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=EPS)
        self.attn = _StockAttention(dim, num_heads, qkv_bias)
        self.ls1 = _StockLayerScale(dim, init_values)
        self.drop_path1 = _MaskDropPath()
        self.norm2 = nn.LayerNorm(dim, eps=EPS)
        self.mlp = _StockMlp(dim, int(dim * mlp_ratio))
        self.ls2 = _StockLayerScale(dim, init_values)
        self.drop_path2 = _MaskDropPath()

    def set_drop_rate(self, rate: float) -> None:
        self.drop_path1.set_drop_rate(rate)
        self.drop_path2.set_drop_rate(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _ours_block(shape: Shape, rate: float, attention_backend: str = "auto") -> nn.Module:
    return Block(
        shape.dim,
        shape.heads,
        mlp_ratio=MLP_RATIO,
        qkv_bias=True,
        init_values=INIT_VALUES,
        drop_path=rate,
        norm_layer=functools.partial(LayerNorm, eps=1e-6),
        attn_class=functools.partial(MemEffAttention, backend=attention_backend),
    )


def drop_path_kind(provider_name: str, shape: Shape, rate: float) -> str:
    """How the provider drops samples at ``rate``: "none", "mask" or "subset" (ours' rule: a list
    takes the subset at every ``p > 0``, a tensor above 0.1)."""
    if rate == 0.0:
        return "none"
    if provider_name.startswith("ours") and (shape.multi_crop or rate > 0.1):
        return "subset"
    return "mask"


# --- providers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Provider:
    """One implementation to time.

    Attributes:
        name: its name in tables and results.
        description: one line on what it runs.
        packs: takes the multi-crop list in one call (else one call per crop group).
        backend: our modules' backend, when ours.
        compiles: uses torch.compile (on the CPU only when asked for: compiling is slow there).
    """

    name: str
    description: str
    packs: bool = False
    backend: str | None = None
    compiles: bool = False
    gpu_kernel: bool = False
    library: str | None = None
    attention_backend: str = "auto"


PROVIDERS: tuple[Provider, ...] = (
    Provider(
        "ours",
        "dinov2_fast.nn.Block (backend 'auto'); subset stochastic depth; the list in one packed "
        "call",
        packs=True,
        backend="auto",
    ),
    Provider(
        "ours-sdpa",
        "ours with attention on the torch backend (SDPA; one call per crop group when packed)",
        packs=True,
        backend="auto",
        attention_backend="torch",
    ),
    Provider(
        "torch",
        "stock PyTorch block: nn.LayerNorm, SDPA, LayerScale, per-sample mask drop path; one call "
        "per crop group",
    ),
    Provider(
        "torch.compile",
        "torch.compile(stock block, dynamic=False), one module for the run; one call per crop group",
        compiles=True,
    ),
)
_ORDER = {provider.name: i for i, provider in enumerate(PROVIDERS)}
STOCK = tuple(provider.name for provider in PROVIDERS if provider.backend is None)


def provider_status(
    provider: Provider,
    device: torch.device,
    dtype: torch.dtype,
    shape: Shape | None = None,
    *,
    compile_on_cpu: bool = False,
) -> tuple[str, str]:
    """``("ok", "")`` when ``provider`` can be timed, else ``("skipped" | "not timed", why)``."""
    if shape is not None and (shape.dim % HEAD_DIM or shape.dim < HEAD_DIM):
        return "skipped", f"C must be a multiple of the head width {HEAD_DIM}, got {shape.dim}"
    return common.availability(provider, device, compile_on_cpu=compile_on_cpu)


class Models:
    """The modules of one run, on one device: the shared weights per width, ours per drop rate,
    one stock block per stock provider and width (the compiled one wrapped once, so that its graphs
    are reused across inputs and rates)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._weights: dict[int, dict[str, torch.Tensor]] = {}
        self._stock: dict[tuple[str, int], tuple[StockBlock, nn.Module]] = {}
        self.compiled_for: set[tuple[int, int, int, bool]] = set()

    def weights(self, shape: Shape) -> dict[str, torch.Tensor]:
        """The timing weights: a seeded ours' block at initialization (gammas 1e-5)."""
        if shape.dim not in self._weights:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                block = _ours_block(shape, 0.0)
            self._weights[shape.dim] = {
                key: value.detach().to(self.device) for key, value in block.state_dict().items()
            }
        return self._weights[shape.dim]

    def check_weights(self, shape: Shape) -> dict[str, torch.Tensor]:
        """The timing weights with the LayerScale gammas in [0.5, 1.5): the branches show."""
        weights = dict(self.weights(shape))
        generator = torch.Generator().manual_seed(1)
        for key in ("ls1.gamma", "ls2.gamma"):
            gamma = 0.5 + torch.rand(shape.dim, generator=generator)
            weights[key] = gamma.to(self.device)
        return weights

    def module(self, provider: Provider, shape: Shape, rate: float) -> tuple[nn.Module, nn.Module]:
        """``(what to call, the block whose parameters it uses)`` for ``provider`` at ``rate``, in
        training mode."""
        if provider.backend is not None:
            block = _ours_block(shape, rate, provider.attention_backend).to(self.device)
            block.load_state_dict(self.weights(shape))
            return block.train(), block
        key = (provider.name, shape.dim)
        if key not in self._stock:
            block = StockBlock(shape.dim, shape.heads).to(self.device)
            block.load_state_dict(self.weights(shape))
            call: nn.Module = block
            if provider.compiles:
                torch._dynamo.reset()
                call = torch.compile(block, dynamic=False)
            self._stock[key] = (block, call)
        block, call = self._stock[key]
        block.set_drop_rate(rate)
        return call.train(), block

    def needs_compile(self, provider: Provider, shape: Shape, rate: float) -> bool:
        """Whether a step of ``provider`` at ``shape`` and ``rate`` compiles a new graph."""
        return provider.compiles and any(
            key not in self.compiled_for for key in self._compile_keys(shape, rate)
        )

    def compiled(self, provider: Provider, shape: Shape, rate: float) -> None:
        if provider.compiles:
            self.compiled_for.update(self._compile_keys(shape, rate))

    @staticmethod
    def _compile_keys(shape: Shape, rate: float) -> list[tuple[int, int, int, bool]]:
        return [(batch, tokens, shape.dim, rate > 0.0) for batch, tokens in shape.groups]


# --- one case ------------------------------------------------------------------------------------


def _autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def _forward(
    provider: Provider, call: nn.Module, xs: Sequence[torch.Tensor], dtype: torch.dtype
) -> list[torch.Tensor]:
    """The block on the input: a tensor, or the list in one call (``packs``) or one per group."""
    with _autocast(xs[0].device, dtype):
        if len(xs) == 1:
            return [call(xs[0])]
        if provider.packs:
            return list(call(list(xs)))
        return [call(x) for x in xs]


def make_inputs(
    shape: Shape, device: torch.device, seed: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(xs, douts)``: fp32 streams that require grad and their dO, one per crop group, the same
    for every provider."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(batch: int, tokens: int) -> torch.Tensor:
        return torch.randn(
            batch, tokens, shape.dim, generator=generator, device=device, dtype=torch.float32
        )

    xs = [randn(batch, tokens).requires_grad_() for batch, tokens in shape.groups]
    douts = [randn(batch, tokens) for batch, tokens in shape.groups]
    return xs, douts


def _subset(t: torch.Tensor) -> torch.Tensor:
    """The first and the last sample."""
    index = torch.tensor(sorted({0, t.shape[0] - 1}), device=t.device)
    return t.detach().index_select(0, index)


def _check(
    models: Models,
    provider: Provider,
    shape: Shape,
    xs: Sequence[torch.Tensor],
    dtype: torch.dtype,
) -> float:
    """``max |Δ - Δref| / max |Δref|`` over the crop groups (see the module docstring)."""
    weights = models.check_weights(shape)
    reference = StockBlock(shape.dim, shape.heads).to(device=models.device, dtype=torch.float64)
    reference.load_state_dict({key: value.double() for key, value in weights.items()})
    reference.eval()
    if provider.compiles:  # the compiled module at p = 0 in training mode: no recompile
        call, block = models.module(provider, shape, 0.0)
        block.load_state_dict(weights)
        try:
            outs = _forward(provider, call, xs, dtype)
        finally:
            block.load_state_dict(models.weights(shape))
        models.compiled(provider, shape, 0.0)
    else:
        if provider.backend is not None:
            block = _ours_block(shape, 0.0).to(models.device)
        else:
            block = StockBlock(shape.dim, shape.heads).to(models.device)
        block.load_state_dict(weights)
        with torch.no_grad():
            outs = _forward(provider, block.eval(), xs, dtype)
    error = 0.0
    with torch.no_grad():
        for x, out in zip(xs, outs):
            x_subset = _subset(x)
            delta = _subset(out).double() - x_subset.double()
            ref_delta = reference(x_subset.double()) - x_subset.double()
            error = max(error, common.relative_error(delta, ref_delta))
    return error


def make_step(
    models: Models,
    provider: Provider,
    shape: Shape,
    rate: float,
    dtype: torch.dtype,
    inputs: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] | None = None,
) -> Callable[[], tuple[torch.Tensor, ...]]:
    """One training step of ``provider``'s block at drop rate ``rate`` on ``inputs`` (``(xs,
    douts)``, by default :func:`make_inputs`): the forward under ``torch.autocast(dtype)`` (none for
    fp32), then the gradients of the inputs and every parameter, created by ``torch.autograd.grad``
    (so that a CUDA graph can hold them) and returned."""
    xs, douts = inputs if inputs is not None else make_inputs(shape, models.device)
    call, block = models.module(provider, shape, rate)
    leaves = [*xs, *block.parameters()]

    def step() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(_forward(provider, call, xs, dtype), leaves, douts)

    return step


# --- running -------------------------------------------------------------------------------------


def parse_shapes(text: str) -> list[Shape]:
    """``"64x257x1024,64x257x1024+256x50x1024"`` -> ``[BATCH, MULTI_CROP]``: one group is a tensor
    input, several joined by "+" the multi-crop list; ValueError if malformed."""
    shapes = []
    for item in common.split_shapes(text):
        groups, dim = common.parse_groups(item, "block", "64x257x1024,64x257x1024+256x50x1024")
        if dim % HEAD_DIM:
            raise ValueError(
                f"block shapes need C a multiple of {HEAD_DIM} (the head width), got {item!r}"
            )
        shapes.append(Shape(groups, dim))
    return shapes


def _record(
    provider: Provider, shape: Shape, rate: float, status: str, dtype: torch.dtype, **fields
) -> Record:
    subset = drop_path_kind(provider.name, shape, rate) == "subset"
    defaults = {
        "input": shape.input,
        "groups": [list(group) for group in shape.groups],
        "dim": shape.dim,
        "heads": shape.heads,
        "tokens": shape.tokens,
        "drop_rate": rate,
        "drop_path": drop_path_kind(provider.name, shape, rate),
        "kept": [max(int(batch * (1 - rate)), 1) for batch, _ in shape.groups] if subset else None,
        "calls": 1 if provider.packs or not shape.multi_crop else len(shape.groups),
        "graph_ms": None,
        "peak_MiB": None,
        "time_ratio": None,
        "graph_time_ratio": None,
        "memory_ratio": None,
        "baseline": "torch",
    }
    return common.new_record(
        "block", provider, "fwd+bwd", shape.name, status, dtype, {**defaults, **fields}
    )


def _measure(
    context: BenchContext, provider: Provider, shape: Shape, models: Models
) -> list[Record]:
    """Every drop rate of one provider at one input (see ``common.measure_passes``)."""

    def short_of_time(rate: float) -> str:
        """Why no measurement at ``rate`` starts now, or "" when one can."""
        if context.out_of_time():
            return common.OUT_OF_TIME
        left = context.seconds_left()
        if left is not None and left < COMPILE_RESERVE_S:
            if models.needs_compile(provider, shape, rate):
                return OUT_OF_TIME_COMPILE
        return ""

    def body() -> Iterator[Record]:  # run by measure_passes: errors are caught there
        why = short_of_time(0.0)  # the check runs (and compiles) the block at p = 0
        if why:
            for rate in MEASURE_ORDER:
                yield _record(provider, shape, rate, "skipped", context.dtype, note=why)
            return
        xs, douts = make_inputs(shape, context.device)
        error = _check(models, provider, shape, xs, context.dtype)
        good = common.within(error, TOLERANCE.get(context.dtype, 0.0))
        for rate in MEASURE_ORDER:
            why = short_of_time(rate)
            if why:
                yield _record(provider, shape, rate, "skipped", context.dtype, note=why)
                continue
            step = make_step(models, provider, shape, rate, context.dtype, (xs, douts))
            context.say(f"block {shape.input} {shape.name} p={rate:g} {provider.name}")
            step()  # compiles what needs compiling, builds the caches
            models.compiled(provider, shape, rate)
            peak = common.peak_extra_bytes(context.device, step)
            ms, graph_ms, host_ms, note = common.time_call_graphed(context, step)
            yield _record(
                provider,
                shape,
                rate,
                "ok",
                context.dtype,
                ms=ms,
                graph_ms=graph_ms,
                peak_MiB=None if peak is None else peak / 2**20,
                max_rel_err=error,
                check="ok" if good else "MISMATCH",
                host_ms=host_ms,
                note=note,
            )
            del step

    return common.measure_passes(context, provider, shape, body(), _record, passes=MEASURE_ORDER)


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def _finish(records: list[Record]) -> None:
    """Order by provider then drop rate; ratios against p = 0 and speedups against torch."""
    records.sort(key=lambda r: (_ORDER[r["provider"]], r["drop_rate"]))
    timed = {(r["shape"], r["provider"], r["drop_rate"]): r for r in records if r["status"] == "ok"}
    for record in records:
        if record["status"] != "ok":
            continue
        base = timed.get((record["shape"], record["provider"], 0.0))
        if base is not None:
            record["time_ratio"] = _ratio(record["ms"], base["ms"])
            record["graph_time_ratio"] = _ratio(record["graph_ms"], base["graph_ms"])
            record["memory_ratio"] = _ratio(record["peak_MiB"], base["peak_MiB"])
        stock = timed.get((record["shape"], "torch", record["drop_rate"]))
        if stock is not None:
            record["speedup"] = stock["ms"] / record["ms"]


def run(
    context: BenchContext, shapes: Sequence[Shape] | None = None
) -> tuple[list[Record], list[str]]:
    """Time every provider at every input and drop rate. Returns (records, notes)."""
    shapes, notes = common.choose_shapes(
        context,
        shapes,
        full=SHAPES,
        quick=QUICK_SHAPES,
        cpu=[shape.scaled_down(CPU_BATCH_DIVISOR, CPU_DIM) for shape in SHAPES],
        cpu_scaling=f"B/{CPU_BATCH_DIVISOR} rounded up, C={CPU_DIM}",
        gpu_kernels=["ours (Triton attention, LayerNorm and stochastic-depth kernels)"],
    )
    if context.device.type != "cuda":
        notes.append(
            "ours ran with backend='auto', the torch reference of its ops on the CPU; no memory "
            "numbers or CUDA-graph times without a GPU"
        )
    models = Models(context.device)

    def measure(context: BenchContext, provider: Any, shape: Any) -> list[Record]:
        return _measure(context, provider, shape, models)

    records = common.run_providers(
        context,
        shapes,
        PROVIDERS,
        status=provider_status,
        measure=measure,
        record=_record,
        finish_shape=_finish,
        passes=MEASURE_ORDER,
    )
    return records, notes


# --- tables --------------------------------------------------------------------------------------


def _order(record: Record) -> tuple:
    return record["shape"], _ORDER.get(record["provider"], len(_ORDER)), record["drop_rate"]


def _cells(record: Record) -> list[str]:
    return [
        record["input"],
        record["shape"],
        record["provider"],
        f"{record['drop_rate']:g}",
        record["drop_path"],
        common.number(record["ms"], 3),
        common.number(record["graph_ms"], 3),
        common.speedup(record["time_ratio"]),
        common.number(record["peak_MiB"], 0),
        common.speedup(record["memory_ratio"]),
        common.speedup(record["speedup"]),
        common.error(record["max_rel_err"]),
        "MISMATCH" if record["check"] == "MISMATCH" else record["note"],
    ]


def table(records: Sequence[Record]) -> Table:
    """One row per timed provider x input x drop rate; skipped providers are listed under it."""
    result = common.provider_table(
        "ViT block training step, forward+backward (median ms eager and CUDA-graph replay; peak "
        "MiB above inputs and weights)",
        [
            "input",
            "shape",
            "provider",
            "p",
            "drop path",
            "ms",
            "graph ms",
            "time vs p=0",
            "peak MiB",
            "mem vs p=0",
            "vs torch",
            "err",
            "note",
        ],
        records,
        _cells,
        order=_order,
    )
    result.notes.append(
        "time vs p=0 / mem vs p=0: ms and peak MiB over the same provider's at p=0; vs torch: the "
        "stock eager block's ms over this one; err: max |Δ - float64 Δref| / max |Δref| of what "
        "the block adds to the stream, eval mode, first and last sample of each crop group"
    )
    return result


def _default_shape(record: Record) -> bool:
    groups = [tuple(group) for group in record["groups"]]
    return record["dim"] == BATCH.dim and groups in (list(BATCH.groups), list(MULTI_CROP.groups))


def headline(records: Sequence[Record]) -> Table | None:
    """At p = 0.4 against p = 0: ours and the stock provider fastest at p = 0.4, per input; None if
    ours was not measured at both rates."""
    timed = {
        (r["input"], r["provider"], r["drop_rate"]): r
        for r in records
        if r["status"] == "ok" and r["dtype"] == "bf16" and _default_shape(r)
    }
    result = Table(
        f"ViT-L block step at drop rate {HEADLINE_RATE:g} against 0 (TARGETS.md)",
        [
            "input",
            "provider",
            "ms p=0",
            f"ms p={HEADLINE_RATE:g}",
            "time ratio",
            "graph ratio",
            "MiB p=0",
            f"MiB p={HEADLINE_RATE:g}",
            "memory ratio",
            "vs stock best",
            "target",
            "verdict",
        ],
    )
    for kind in ("batch", "multi-crop"):
        stock = [
            timed[(kind, name, HEADLINE_RATE)]
            for name in STOCK
            if (kind, name, HEADLINE_RATE) in timed and (kind, name, 0.0) in timed
        ]
        best = min(stock, key=lambda r: r["ms"]) if stock else None
        ours = timed.get((kind, "ours", HEADLINE_RATE))
        for record in (ours, best):
            if record is None or (kind, record["provider"], 0.0) not in timed:
                continue
            base = timed[(kind, record["provider"], 0.0)]
            target = verdict = versus = ""
            if record["ours"]:
                target = f"<= {TARGET_RATIO}x time and memory"
                verdict = _verdict(record, base)
                if best is not None:
                    versus = common.speedup(best["ms"] / record["ms"])
            else:
                versus = "(stock best)"
            result.rows.append(
                [
                    kind,
                    record["provider"],
                    common.number(base["ms"], 3),
                    common.number(record["ms"], 3),
                    common.speedup(record["time_ratio"]),
                    common.speedup(record["graph_time_ratio"]),
                    common.number(base["peak_MiB"], 0),
                    common.number(record["peak_MiB"], 0),
                    common.speedup(record["memory_ratio"]),
                    versus,
                    target,
                    verdict,
                ]
            )
    if not any(row[1] == "ours" for row in result.rows):
        return None
    result.notes.append(
        "ratios: the same provider's step at p=0.4 over its step at p=0 (graph ratio: of the "
        "CUDA-graph replay times); vs stock best: the fastest stock provider's ms at p=0.4 over "
        "ours; the verdict is on the eager time and the peak memory"
    )
    return result


def _verdict(record: Record, base: Record) -> str:
    if record["check"] == "MISMATCH" or base["check"] == "MISMATCH":
        return "MISMATCH: wrong results"
    ratios = {"time": record["time_ratio"], "memory": record["memory_ratio"]}
    missing = [name for name, value in ratios.items() if value is None]
    if missing:
        return f"no {' or '.join(missing)} ratio"
    above = [f"{name} {value:.2f}x" for name, value in ratios.items() if value > TARGET_RATIO]
    return "goal met" if not above else f"below goal ({', '.join(above)})"


BENCHMARK = Benchmark(
    name="block",
    summary="ViT-L block training step at drop rates 0-0.4, batch and multi-crop inputs: ours vs "
    "stock PyTorch and torch.compile; time, peak memory and their ratios to p=0",
    shapes_help="BxNxC (a tensor) or BxNxC+BxNxC (the multi-crop list),... "
    "(e.g. 64x257x1024,64x257x1024+256x50x1024)",
    parse_shapes=parse_shapes,
    run=run,
    table=table,
    headline=headline,
)
