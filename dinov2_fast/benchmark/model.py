"""Model benchmark: a whole ViT's inference and training step, patched against unpatched.

The model (``--source``):

- ``dinov2`` (the default): DINOv2's ``DinoVisionTransformer`` (``dinov2_fast.models``, with the
  torch.hub configuration of ``--arch`` for its sizes) built with stock PyTorch blocks,
  :class:`StockDinoBlock`: DINOv2's block as it runs without xFormers (``nn.LayerNorm`` eps 1e-6,
  SDPA attention, LayerScale, DINOv2's subset stochastic depth in plain torch). Like DINOv2's
  training configs: LayerScale (init 1e-5), unchunked blocks, an MLP (ViT-g: SwiGLU), no
  registers, the same drop rate in every block (``drop_path_uniform``);
- ``timm``: timm's ``vit_*_patch14_dinov2`` (``pretrained=False``, ``num_classes=0``; skipped
  when timm is not installed), its drop path made uniform too (timm ramps it up over the blocks).

Patch 14, ``--batch`` images (32) of ``--img-size`` px (224), drop rate ``--drop-path`` (0.4, as
DINOv2's ViT-L/14 config), fp32 parameters and images, ``--dtype`` autocast (bf16; fp32: none).
Without a GPU a tiny configuration runs (:data:`CPU_DEPTH` blocks, small batch and images): the
CPU numbers only show that the benchmark runs.

Providers (:data:`PROVIDERS`), all with the same weights (the state_dict of one seeded model):

- ``unpatched``: the model as built;
- ``patched``: the same model through ``dinov2_fast.patch`` (backend "auto");
- ``unpatched+compile``, ``patched+compile``: each block compiled (``block.compile(dynamic=False)``):
  the blocks are alike, so they share one graph per mode and the compile takes about one block's
  time (one graph of the whole model takes tens of times longer); the patch embedding and the
  final norm run eagerly. Compile time is not in ``ms``: ``first_call_s`` shows it.

Passes (:data:`PASSES`):

- ``inference``: eval mode, ``torch.no_grad``: ``model(images)`` -> the CLS features ``[B, D]``;
- ``train``: train mode: ``forward_features(images)``, loss = mean of the CLS features + mean of
  the patch tokens (in fp32), then ``torch.autograd.grad`` for every parameter (returned, so that
  a CUDA graph can hold them). No optimizer step. The RNG is seeded alike before each provider's
  step, so all draw from the same stream.

Reported per provider and pass: ``ms`` (median ``do_bench`` of eager calls), ``graph_ms`` (the call
captured once in a CUDA graph and replayed; where the capture fails the note says why),
``images_per_s`` (``batch`` over ``ms``), ``peak_MiB`` (the most memory allocated during one call
beyond what was allocated before it, i.e. above the weights and the images: activations and
outputs, for ``train`` also the returned gradients, ``params_MiB``), ``peak_total_MiB`` (the
absolute peak, weights included), ``first_call_s`` (the first call, compile included), and
``speedup``: the unpatched provider's ``ms`` over this one's.

Correctness: each provider's first inference output is compared with the unpatched model's in
float64 (same weights, no autocast): ``max_rel_err`` is ``max |out - ref| / max |ref|``; over
:data:`TOLERANCE` both of the provider's records say ``"check": "MISMATCH"``. For the check to see
every block, the LayerScale gammas of the weights are drawn in [0.5, 1.5) (at DINOv2's 1e-5 the
blocks would vanish from the output); the timing does not depend on their values.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dinov2_fast.benchmark import BenchContext, Benchmark, Record, Table, common
from dinov2_fast.benchmark.block import (
    COMPILE_RESERVE_S,
    OUT_OF_TIME_COMPILE,
    _autocast,
)
from dinov2_fast.nn.block import get_branges_scales
from dinov2_fast.train import baseline

__all__ = [
    "ARCHS",
    "BENCHMARK",
    "PASSES",
    "PROVIDERS",
    "SOURCES",
    "Arch",
    "Config",
    "Models",
    "Options",
    "Provider",
    "StockDinoBlock",
    "build_stock",
    "make_step",
    "parse_shapes",
    "provider_status",
    "run",
]

PASSES = ("inference", "train")
SOURCES = ("dinov2", "timm")
PATCH_SIZE = 14
INIT_VALUES = 1e-5  # DINOv2's training configs (layerscale)
EPS = 1e-6
# The defaults, and what replaces them with --quick or without a GPU (explicit options win).
DEFAULTS = {"arch": "vit_large", "batch": 32, "img_size": 224, "drop_path": 0.4, "source": "dinov2"}
QUICK = {"arch": "vit_small", "batch": 2, "img_size": 28}
CPU = {"batch": 2, "img_size": 56}
CPU_DEPTH = 2  # blocks, with --quick or without a GPU
# max |out - ref| / max |ref| of the CLS features against the float64 unpatched model, per autocast
# dtype (fp32: TF32 in convolutions and in our attention kernels). ViT-S and ViT-L at bf16 measured
# ~1e-2, patched or not (CPU).
TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 2e-2, torch.float32: 1e-2}
# do_bench budgets on a GPU (a training step of ViT-L takes tens of ms: the default 100 ms would
# time only a few).
GPU_WARMUP_MS = 100
GPU_REP_MS = 500
SEED = 0


# --- configurations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    """A DINOv2 architecture: its torch.hub configuration (sizes, FFN) and timm's model of it."""

    name: str
    label: str
    hub_name: str
    timm_name: str


ARCHS: dict[str, Arch] = {
    arch.name: arch
    for arch in (
        Arch("vit_small", "ViT-S/14", "dinov2_vits14", "vit_small_patch14_dinov2"),
        Arch("vit_base", "ViT-B/14", "dinov2_vitb14", "vit_base_patch14_dinov2"),
        Arch("vit_large", "ViT-L/14", "dinov2_vitl14", "vit_large_patch14_dinov2"),
        Arch("vit_giant2", "ViT-g/14", "dinov2_vitg14", "vit_giant_patch14_dinov2"),
    )
}


@dataclass(frozen=True)
class Config:
    """What one run measures. ``depth``: the number of blocks, None for the architecture's."""

    arch: str
    batch: int
    img_size: int
    drop_path: float
    source: str
    depth: int | None = None

    @property
    def name(self) -> str:
        depth = "" if self.depth is None else f" depth {self.depth}"
        return f"{self.arch}{depth} {self.source} {self.batch}x{self.img_size}px"

    @property
    def tokens(self) -> int:
        """Per image: the CLS token and the patches."""
        return 1 + (self.img_size // PATCH_SIZE) ** 2


@dataclass(frozen=True)
class Options:
    """The model benchmark's command-line options (``--arch``, ``--batch``, ``--img-size``,
    ``--drop-path``, ``--source``); None leaves the default of the mode the run is in.

    Raises:
        ValueError: an unknown arch or source, a batch below 1, an image size that is not a
            positive multiple of the patch size 14, a drop rate outside [0, 1).
    """

    arch: str | None = None
    batch: int | None = None
    img_size: int | None = None
    drop_path: float | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        if self.arch is not None and self.arch not in ARCHS:
            raise ValueError(f"--arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.source is not None and self.source not in SOURCES:
            raise ValueError(f"--source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.batch is not None and self.batch < 1:
            raise ValueError(f"--batch must be at least 1, got {self.batch}")
        if self.img_size is not None and (self.img_size < 1 or self.img_size % PATCH_SIZE):
            raise ValueError(
                f"--img-size must be a positive multiple of the patch size {PATCH_SIZE}, got "
                f"{self.img_size}"
            )
        if self.drop_path is not None and not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"--drop-path must be in [0, 1), got {self.drop_path:g}")

    def given(self) -> bool:
        return any(value is not None for value in dataclasses.astuple(self))

    def resolve(self, *, quick: bool, on_gpu: bool) -> Config:
        """The configuration to run: the options given, the rest from :data:`DEFAULTS` (with
        :data:`QUICK`'s or, without a GPU, :data:`CPU`'s in their place, and :data:`CPU_DEPTH`
        blocks)."""
        defaults = dict(DEFAULTS)
        small = quick or not on_gpu
        if small:
            defaults.update(QUICK if quick else CPU)
        given = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return Config(**{**defaults, **given}, depth=CPU_DEPTH if small else None)


def parse_shapes(text: str) -> list[Options]:
    """The model benchmark takes no ``--shapes``: ValueError saying what it takes instead."""
    raise ValueError(
        "model takes --arch, --batch, --img-size, --drop-path and --source, not --shapes"
    )


# --- the stock model -----------------------------------------------------------------------------


def _drop_add_residual_stochastic_depth(
    x: torch.Tensor, residual_func: Callable[[torch.Tensor], torch.Tensor], sample_drop_ratio: float
) -> torch.Tensor:
    """DINOv2's ``drop_add_residual_stochastic_depth`` in stock torch: the branch on a random
    subset ``x[brange]`` of ``k`` samples, added back with ``torch.index_add`` and alpha ``B / k``."""
    brange, scale = get_branges_scales(x, sample_drop_ratio)
    residual = residual_func(x[brange])
    out = torch.index_add(x.flatten(1), 0, brange, residual.flatten(1).to(x.dtype), alpha=scale)
    return out.view_as(x)


class StockDinoBlock(baseline.Block):
    """DINOv2's ``Block`` as it runs without xFormers, in stock PyTorch: DINOv2's constructor (the
    call ``DinoVisionTransformer`` makes), children ``norm1, attn, ls1, drop_path1, norm2, mlp,
    ls2, drop_path2``, attribute ``sample_drop_ratio`` and state_dict keys.

    ``forward(x)``, ``x: [B, N, C]``, with ``attn_res = ls1(attn(norm1(x)))`` and ``ffn_res =
    ls2(mlp(norm2(x)))``: in training with ``sample_drop_ratio > 0.1`` each branch runs on
    ``x[brange]``, a random subset of ``max(int(B·(1-p)), 1)`` samples (``torch.randperm``), added
    back with ``torch.index_add`` scaled by ``B / k``; in training with ``0 < p <= 0.1``
    ``x + drop_path1(attn_res(x))`` then ``x + drop_path1(ffn_res(x))`` (DINOv2 uses drop_path1
    for both); else the plain residuals. Dropout (``drop``, ``attn_drop``) must be 0.
    """

    def __init__(self, *args, **kwargs) -> None:
        for name in ("drop", "attn_drop"):
            if kwargs.get(name):
                raise ValueError(f"{name} must be 0 in the stock block, got {kwargs[name]}")
        super().__init__(*args, attn_class=baseline.SdpaAttention, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def attn_residual_func(x: torch.Tensor) -> torch.Tensor:
            return self.ls1(self.attn(self.norm1(x)))

        def ffn_residual_func(x: torch.Tensor) -> torch.Tensor:
            return self.ls2(self.mlp(self.norm2(x)))

        ratio = self.sample_drop_ratio
        if self.training and ratio > 0.1:
            x = _drop_add_residual_stochastic_depth(x, attn_residual_func, ratio)
            return _drop_add_residual_stochastic_depth(x, ffn_residual_func, ratio)
        if self.training and ratio > 0.0:
            x = x + self.drop_path1(attn_residual_func(x))
            return x + self.drop_path1(ffn_residual_func(x))
        x = x + attn_residual_func(x)
        return x + ffn_residual_func(x)


def _uniform_drop_path(model: nn.Module, rate: float) -> None:
    """timm's blocks at one drop rate (timm ramps it from 0 over the blocks; DINOv2's configs do
    not: ``drop_path_uniform``)."""
    from timm.layers import DropPath as TimmDropPath

    for block in model.blocks:
        for name in ("drop_path1", "drop_path2"):
            setattr(block, name, TimmDropPath(rate) if rate > 0.0 else nn.Identity())


def build_stock(config: Config, device: torch.device) -> nn.Module:
    """The unpatched model of ``config`` on ``device``, freshly initialized (see the module
    docstring). ``--source timm`` imports timm here."""
    arch = ARCHS[config.arch]
    with torch.device(device):
        if config.source == "timm":
            import timm

            extra = {} if config.depth is None else {"depth": config.depth}
            model = timm.create_model(
                arch.timm_name,
                pretrained=False,
                img_size=config.img_size,
                drop_path_rate=config.drop_path,
                num_classes=0,
                **extra,
            )
            _uniform_drop_path(model, config.drop_path)
            return model
        from dinov2_fast import models

        kwargs = models.hub_config(arch.hub_name)
        if config.depth is not None:
            kwargs["depth"] = config.depth
        kwargs.update(
            img_size=config.img_size,
            init_values=INIT_VALUES,
            drop_path_rate=config.drop_path,
            drop_path_uniform=True,
            norm_layer=functools.partial(nn.LayerNorm, eps=EPS),
            block_fn=StockDinoBlock,
        )
        return models.DinoVisionTransformer(**kwargs)


def _features(model: nn.Module, images: torch.Tensor, source: str):
    """``(CLS features [B, D], patch tokens [B, N, D])`` after the final norm."""
    if source == "timm":
        tokens = model.forward_features(images)
        return tokens[:, 0], tokens[:, model.num_prefix_tokens :]
    out = model.forward_features(images)
    return out["x_norm_clstoken"], out["x_norm_patchtokens"]


# --- providers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Provider:
    """One way to run the model.

    Attributes:
        name: its name in tables and results.
        description: one line on what it runs.
        patched: through ``dinov2_fast.patch``.
        backend: the patch's backend (None: unpatched, a comparison).
        compiles: each block under torch.compile (on the CPU only with ``--compile``).
    """

    name: str
    description: str
    patched: bool = False
    backend: str | None = None
    compiles: bool = False
    gpu_kernel: bool = False
    library: str | None = None


PROVIDERS: tuple[Provider, ...] = (
    Provider("unpatched", "the model as built (stock PyTorch blocks, or timm's)"),
    Provider(
        "patched",
        "the model through dinov2_fast.patch (backend 'auto'): fused LayerNorm, attention and "
        "stochastic depth",
        patched=True,
        backend="auto",
    ),
    Provider(
        "unpatched+compile",
        "the unpatched model with each block under torch.compile(dynamic=False)",
        compiles=True,
    ),
    Provider(
        "patched+compile",
        "the patched model with each block under torch.compile(dynamic=False)",
        patched=True,
        backend="auto",
        compiles=True,
    ),
)
_ORDER = {provider.name: i for i, provider in enumerate(PROVIDERS)}
BASELINE = "unpatched"


def provider_status(
    provider: Provider,
    device: torch.device,
    dtype: torch.dtype,
    config: Config | None = None,
    *,
    compile_on_cpu: bool = False,
) -> tuple[str, str]:
    """``("ok", "")`` when ``provider`` can run ``config`` here, else ``("skipped" | "not timed",
    why)``: the timm model needs timm, torch.compile on the CPU needs ``--compile``."""
    if config is not None and config.source == "timm":
        provider = dataclasses.replace(provider, library="timm")
    return common.availability(provider, device, compile_on_cpu=compile_on_cpu)


class Models:
    """One configuration's inputs and models on one device: the seeded weights (kept on the
    CPU), the images, the float64 reference output; builds each provider's model."""

    def __init__(self, config: Config, device: torch.device) -> None:
        self.config = config
        self.device = device
        generator = torch.Generator(device=device).manual_seed(SEED)
        self.images = torch.randn(
            config.batch, 3, config.img_size, config.img_size, generator=generator, device=device
        )
        self._weights: dict[str, torch.Tensor] | None = None
        self._reference: torch.Tensor | None = None

    def weights(self) -> dict[str, torch.Tensor]:
        """A seeded model's state_dict, its LayerScale gammas drawn in [0.5, 1.5)."""
        if self._weights is None:
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(SEED)
                model = build_stock(self.config, self.device)
            generator = torch.Generator().manual_seed(SEED + 1)
            weights = {}
            for key, value in model.state_dict().items():
                value = value.detach().cpu()
                if key.endswith(("ls1.gamma", "ls2.gamma")):
                    value = 0.5 + torch.rand(value.shape, generator=generator)
                weights[key] = value
            self._weights = weights
        return self._weights

    def build(self, provider: Provider) -> tuple[nn.Module, Any]:
        """``(model, patch report or None)``: ``provider``'s model with the weights, on the
        device."""
        model = build_stock(self.config, self.device)
        model.load_state_dict(self.weights())
        report = None
        if provider.patched:
            from dinov2_fast import patch

            report = patch(model, backend=provider.backend or "auto")
        if provider.compiles:
            torch._dynamo.reset()
            for block in model.blocks:
                block.compile(dynamic=False)
        return model, report

    def reference(self) -> torch.Tensor:
        """The unpatched model's CLS features of the images in float64, ``[B, D]``."""
        if self._reference is None:
            model = build_stock(self.config, self.device)
            model.load_state_dict(self.weights())
            model.double().eval()
            with torch.no_grad():
                self._reference = model(self.images.double())
            del model
        return self._reference


def make_step(
    model: nn.Module, config: Config, pass_: str, images: torch.Tensor, dtype: torch.dtype
) -> Callable[[], Any]:
    """One call of ``pass_`` ("inference" or "train", see the module docstring) on ``images``
    under ``torch.autocast(dtype)`` (none for fp32); sets the model's mode."""
    autocast = functools.partial(_autocast, images.device, dtype)
    if pass_ == "inference":
        model.eval()

        def infer() -> torch.Tensor:
            with torch.no_grad(), autocast():
                return model(images)

        return infer
    if pass_ != "train":
        raise ValueError(f"pass_ must be one of {', '.join(PASSES)}, got {pass_!r}")
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]

    def train() -> tuple[torch.Tensor | None, ...]:
        with autocast():
            cls, patches = _features(model, images, config.source)
            loss = cls.float().mean() + patches.float().mean()
        # allow_unused: DINOv2's mask_token takes no part without masks.
        return torch.autograd.grad(loss, parameters, allow_unused=True)

    return train


# --- running -------------------------------------------------------------------------------------


def _record(
    provider: Provider, config: Config, pass_: str, status: str, dtype: torch.dtype, **fields
) -> Record:
    arch = ARCHS[config.arch]
    defaults = {
        "arch": config.arch,
        "label": arch.label,
        "source": config.source,
        "depth": config.depth,
        "batch": config.batch,
        "img_size": config.img_size,
        "patch_size": PATCH_SIZE,
        "tokens": config.tokens,
        "drop_rate": config.drop_path,
        "compiled": provider.compiles,
        "params": None,
        "params_MiB": None,
        "graph_ms": None,
        "images_per_s": None,
        "graph_images_per_s": None,
        "peak_MiB": None,
        "peak_total_MiB": None,
        "first_call_s": None,
        "patch": None,
        "baseline": BASELINE,
    }
    return common.new_record(
        "model", provider, pass_, config.name, status, dtype, {**defaults, **fields}
    )


def _timer(context: BenchContext):
    if context.device.type != "cuda" or context.quick:
        return context.timer
    timer = context.timer
    return dataclasses.replace(
        timer, warmup_ms=max(timer.warmup_ms, GPU_WARMUP_MS), rep_ms=max(timer.rep_ms, GPU_REP_MS)
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(
    context: BenchContext, provider: Provider, config: Config, models: Models
) -> list[Record]:
    """Both passes of one provider (see ``common.measure_passes``)."""
    device, dtype = context.device, context.dtype
    timed = dataclasses.replace(context, timer=_timer(context))

    def short_of_time() -> str:
        """Why no pass starts now, or "" when one can (a compiled pass compiles first)."""
        if context.out_of_time():
            return common.OUT_OF_TIME
        left = context.seconds_left()
        if provider.compiles and left is not None and left < COMPILE_RESERVE_S:
            return OUT_OF_TIME_COMPILE
        return ""

    def body() -> Iterator[Record]:  # run by measure_passes: errors are caught there
        model, report = models.build(provider)
        params = list(model.parameters())
        sizes = {
            "params": sum(p.numel() for p in params),
            "params_MiB": sum(p.numel() * p.element_size() for p in params) / 2**20,
            "patch": None if report is None else str(report).splitlines()[0],
        }
        del params
        error = None
        for pass_ in PASSES:
            why = short_of_time()
            if why:
                yield _record(provider, config, pass_, "skipped", dtype, note=why, **sizes)
                continue
            step = make_step(model, config, pass_, models.images, dtype)
            context.say(f"model {config.name} {pass_} {provider.name}")
            torch.manual_seed(SEED)  # the same random stream for every provider
            start = time.perf_counter()
            out = step()  # compiles what needs compiling
            _synchronize(device)
            first_call_s = time.perf_counter() - start
            if pass_ == "inference":
                error = common.relative_error(out, models.reference())
            del out
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            peak = common.peak_extra_bytes(device, step)
            ms, graph_ms, host_ms, note = common.time_call_graphed(timed, step)
            check = None
            if error is not None:
                check = "ok" if common.within(error, TOLERANCE.get(dtype, 0.0)) else "MISMATCH"
            yield _record(
                provider,
                config,
                pass_,
                "ok",
                dtype,
                ms=ms,
                graph_ms=graph_ms,
                images_per_s=_per_second(config.batch, ms),
                graph_images_per_s=_per_second(config.batch, graph_ms),
                peak_MiB=None if peak is None else peak / 2**20,
                peak_total_MiB=None if peak is None else (before + peak) / 2**20,
                first_call_s=first_call_s,
                max_rel_err=error,
                check=check,
                host_ms=host_ms,
                note=note,
                **sizes,
            )
            del step
        del model

    return common.measure_passes(context, provider, config, body(), _record, passes=PASSES)


def _per_second(batch: int, ms: float | None) -> float | None:
    return None if not ms else batch / (ms * 1e-3)


def _finish(records: list[Record]) -> None:
    """Provider then pass order; speedups against the unpatched model."""
    records.sort(key=lambda r: (_ORDER[r["provider"]], PASSES.index(r["pass"])))
    common.add_speedups(records)


def run(
    context: BenchContext, shapes: Sequence[Options] | None = None
) -> tuple[list[Record], list[str]]:
    """Time every provider's inference and training step. ``shapes``: the :class:`Options` of the
    command line (None: the defaults). Returns (records, notes)."""
    on_gpu = context.device.type == "cuda"
    configs = [
        options.resolve(quick=context.quick, on_gpu=on_gpu) for options in (shapes or [Options()])
    ]
    notes: list[str] = []
    if context.quick:
        notes.append(
            f"--quick: a tiny model ({CPU_DEPTH} blocks, small batch and images) and few "
            "repetitions; the numbers are not meaningful"
        )
    elif not on_gpu:
        notes.append(
            f"no GPU: a tiny configuration ({CPU_DEPTH} blocks, batch {CPU['batch']}, "
            f"{CPU['img_size']} px unless given) on the CPU; the times are not meaningful, they "
            "only show that the benchmark runs"
        )
    if not on_gpu:
        notes.append(
            "the patched model ran the torch reference of dinov2-fast's ops on the CPU (backend "
            "'auto'); no memory numbers or CUDA-graph times without a GPU"
        )
    records: list[Record] = []
    for config in configs:
        records += common.run_providers(
            context,
            [config],
            PROVIDERS,
            status=provider_status,
            measure=functools.partial(_measure, models=Models(config, context.device)),
            record=_record,
            finish_shape=_finish,
            passes=PASSES,
        )
    return records, notes


# --- tables --------------------------------------------------------------------------------------


def _describe(record: Record) -> str:
    depth = "" if record["depth"] is None else f", {record['depth']} blocks"
    return (
        f"{record['label']} ({record['arch']}, {record['source']}{depth}), batch {record['batch']} "
        f"at {record['img_size']} px ({record['tokens']} tokens), drop path "
        f"{record['drop_rate']:g}, {record['dtype']}"
    )


def _order(record: Record) -> tuple:
    return record["shape"], PASSES.index(record["pass"]), _ORDER.get(record["provider"], 99)


def _cells(record: Record) -> list[str]:
    return [
        record["shape"],
        record["pass"],
        record["provider"],
        common.number(record["ms"], 2),
        common.number(record["graph_ms"], 2),
        common.number(record["images_per_s"], 1),
        common.number(record["peak_MiB"], 0),
        common.number(record["peak_total_MiB"], 0),
        common.speedup(record["speedup"]),
        common.error(record["max_rel_err"]),
        common.number(record["first_call_s"], 1),
        "MISMATCH" if record["check"] == "MISMATCH" else record["note"],
    ]


def table(records: Sequence[Record]) -> Table:
    """One row per timed provider x pass; skipped providers are listed under it."""
    described = list(dict.fromkeys(_describe(r) for r in records))
    result = common.provider_table(
        "ViT inference and training step: "
        + "; ".join(described)
        + " (median ms eager and CUDA-graph replay)",
        [
            "config",
            "pass",
            "provider",
            "ms",
            "graph ms",
            "images/s",
            "peak MiB",
            "total MiB",
            "vs unpatched",
            "err",
            "first s",
            "note",
        ],
        records,
        _cells,
        order=_order,
    )
    result.notes.append(
        "peak MiB: the most allocated during one call above the weights and images (train: "
        "activations and the returned gradients); total MiB: the absolute peak; vs unpatched: "
        "the unpatched model's ms over this one; err: max |out - float64 unpatched| / max |ref| of "
        "the CLS features in inference; first s: the first call, compile included"
    )
    patched = {r["patch"] for r in records if r["patch"]}
    result.notes += sorted(patched)
    return result


def headline(records: Sequence[Record]) -> Table | None:
    """Patched (and patched+compile) against unpatched and unpatched+compile, per pass, at each
    configuration; None if no patched model was timed."""
    timed = {(r["shape"], r["pass"], r["provider"]): r for r in records if r["status"] == "ok"}
    configs = list(dict.fromkeys(r["shape"] for r in records))
    result = Table(
        "ViT patched against unpatched: "
        + "; ".join(dict.fromkeys(_describe(r) for r in records if r["status"] == "ok")),
        [
            "pass",
            "provider",
            "ms",
            "images/s",
            "vs unpatched",
            "vs unpatched+compile",
            "peak MiB",
            "memory vs unpatched",
            "check",
        ],
    )
    for config in configs:
        for pass_ in PASSES:
            stock = timed.get((config, pass_, "unpatched"))
            compiled = timed.get((config, pass_, "unpatched+compile"))
            for name in ("patched", "patched+compile"):
                record = timed.get((config, pass_, name))
                if record is None:
                    continue
                result.rows.append(
                    [
                        pass_,
                        name,
                        common.number(record["ms"], 2),
                        common.number(record["images_per_s"], 1),
                        _versus(stock, record, "ms"),
                        _versus(compiled, record, "ms"),
                        common.number(record["peak_MiB"], 0),
                        _versus(record, stock, "peak_MiB"),
                        record["check"] or "-",
                    ]
                )
    if not result.rows:
        return None
    result.notes.append(
        "vs: the other provider's ms over this one's (above 1: patched is faster); memory vs "
        "unpatched: this peak over the unpatched one's (below 1: patched uses less); '-' where "
        "the other was not timed"
    )
    return result


def _versus(numerator: Record | None, denominator: Record | None, key: str) -> str:
    if numerator is None or denominator is None:
        return "-"
    top, bottom = numerator[key], denominator[key]
    return common.speedup(top / bottom) if top is not None and bottom else "-"


BENCHMARK = Benchmark(
    name="model",
    summary="a whole ViT (default ViT-L/14, batch 32 at 224 px, drop path 0.4): inference and a "
    "training step, patched vs unpatched and torch.compile; time, images/s, peak memory",
    shapes_help="(not taken: --arch, --batch, --img-size, --drop-path, --source instead)",
    parse_shapes=parse_shapes,
    run=run,
    table=table,
    headline=headline,
)
