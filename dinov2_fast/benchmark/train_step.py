"""Training-step benchmark: the whole DINOv2 trainer's step, implementation by implementation.

One step is :func:`dinov2_fast.train.trainer.training_step`: the schedules' values, the teacher's
forward on the global crops (targets, centering or Sinkhorn-Knopp), the student's forward on all
crops, the DINO, iBOT and KoLeo losses, the backward, gradient clipping, AdamW and the teacher's
EMA. The model and the optimizer come from :func:`~dinov2_fast.train.trainer.build_training`
with a trainer preset (``--arch``: ``vit_small`` -> ``vits14``, ``vit_base`` -> ``vitb14``,
``vit_large`` -> ``vitl14``, ``vit_giant2`` -> ``vitg14``) and these overrides: ``compute.impl``,
``compute.precision`` (``--dtype`` on a GPU, fp32 on the CPU), ``compute.compile``,
``student.drop_path_rate`` (``--drop-path``, default the preset's: 0.4 for ViT-L/14),
``train.batch_size_per_gpu`` (``--batch``, 32) and ``crops.global_crops_size`` (``--img-size``,
224; the local crops keep the preset's size, 98 px at patch 14).

Data: one synthetic batch, built once per run and reused by every step of every provider: random
normal crops of the normalised images' scale (2B global crops ``[2B, 3, S, S]``, nB local crops
``[nB, 3, s, s]``) and iBOT masks from :func:`~dinov2_fast.train.masking.collate_data_and_cast`
with a seeded generator, moved to the device before any timing. No data loading, augmentation or
host-to-device copy is timed: the numbers are the model's and the optimizer's.

Providers (:data:`PROVIDERS`), all from the same initial weights (``build_training`` seeds them):

- ``fast``: ``compute.impl=fast``: our kernels, all crops packed into one pass, subset drop path,
  ``compute.backend=auto`` (per op and shape the measured table's choice, else a fixed order);
- ``fast/triton``, ``fast/cuda``: the same with ``compute.backend`` naming one kernel backend (GPU
  only; skipped with the reason where it cannot run, e.g. the CUDA extension not built);
- ``baseline``: ``compute.impl=baseline``: stock PyTorch as the iBOT code ran it (explicit
  softmax(QKᵀ)V attention, ``nn.LayerNorm``, per-sample mask drop path, one forward per crop
  resolution); the reference of the speed-up and memory ratios;
- ``stock+compile``: ``compute.impl=stock`` (the baseline with SDPA attention) with every ViT block
  compiled (``compute.compile=true``: ``block.compile()``), stock PyTorch at its best;
- ``fast+compile``: ``fast`` with every block compiled.

The compiled providers run last (first to go when ``--time-limit`` runs short) and, on the CPU,
only with ``--compile``; their compile time is not in ``ms``: ``first_call_s`` shows it.

Measured per provider: ``first_call_s`` (the first step: lazy initialisation, autotuning,
compiling), then :data:`GPU_WARMUP` warm-up steps and :data:`GPU_STEPS` timed ones (CUDA events
around each step; fewer with ``--quick`` or on the CPU, timed by the wall clock): ``ms`` is the
median step, ``images_per_s`` the batch over it. ``peak_MiB`` is ``torch.cuda.max_memory_allocated``
over the timed steps, the absolute peak (the weights, the teacher, the optimizer state and the
batch included: the targets compare the whole step); ``resident_MiB`` what stays allocated between
steps (those, plus the last step's gradients); ``params_MiB`` and ``optimizer_MiB`` the student's
and teacher's parameters and buffers, and the AdamW state, counted. Every step ends with the
trainer's finite-loss check, one host sync, as in training.

Correctness, cheaply: every loss of the first step must be finite, and the total loss of every
later one (the trainer checks it); otherwise the provider's row is an error, "FAILED: non-finite
loss at step S: ...". ``loss`` and ``losses`` are the first step's: at drop path 0 the
implementations compute the same (a test checks it on the CPU).

Without a GPU or with ``--quick``, unless ``--arch`` is given: the trainer's ``demo`` preset (a
4-block ViT of width 128 on 32 px crops with patch 4), batch 4, few steps: the numbers only show
that the benchmark runs.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dinov2_fast.benchmark import DTYPES, BenchContext, Benchmark, Record, Table, common, dtype_name

__all__ = [
    "BASELINE",
    "BENCHMARK",
    "PASS",
    "PLOT_FORMATS",
    "PRESETS",
    "PROVIDERS",
    "STOCK_COMPILED",
    "Config",
    "Options",
    "Provider",
    "make_batch",
    "parse_shapes",
    "plot",
    "run",
    "training_config",
]

PASS = "train"
# --arch -> the trainer preset of that architecture (dinov2_fast/train/configs/*.yaml).
PRESETS = {
    "vit_small": "vits14",
    "vit_base": "vitb14",
    "vit_large": "vitl14",
    "vit_giant2": "vitg14",
}
LABELS = {
    "vit_small": "ViT-S/14",
    "vit_base": "ViT-B/14",
    "vit_large": "ViT-L/14",
    "vit_giant2": "ViT-g/14",
}
TINY_PRESET = "demo"  # with --quick or without a GPU, unless --arch is given
DEFAULTS = {"arch": "vit_large", "batch": 32, "img_size": 224}
SMALL = {"batch": 4}  # with --quick or without a GPU
GPU_WARMUP, GPU_STEPS = 3, 10
SMALL_WARMUP, SMALL_STEPS = 1, 3
# Start a compiled provider only with this much time before the deadline: the trainer compiles
# the student's blocks for the global and the local crops and the teacher's, forward and backward.
COMPILE_RESERVE_S = 150.0
OUT_OF_TIME_COMPILE = f"out of time (--time-limit): compiling needs ~{COMPILE_RESERVE_S:.0f} s"
SEED = 0
# The targets (TARGETS.md, end to end), on one H100 at ViT-L/14 and 32 images per step.
TARGET_SPEEDUP = 2.0  # fast over baseline, images/s
TARGET_MEMORY = 1 / 3  # fast's peak over baseline's
TARGET_VS_STOCK = 1.2  # fast over stock+compile, images/s
TARGET_CONFIG = ("vit_large", 32, 224)
PLOT_FORMATS = ("png", "pdf", "svg")


# --- configurations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """What one run measures: a trainer preset and the sizes of its batch.

    Attributes:
        preset: the trainer preset (``vitl14``, or ``demo`` for the tiny model).
        arch: ``--arch`` (``vit_large``), or None for the demo preset's custom ViT.
        batch: images per step.
        img_size: the global crops' side; local_size: the local crops' side (the preset's).
        local_crops: local crops per image; patch_size: the preset's.
        drop_path: the student's drop-path rate.
        warmup, steps: untimed steps after the first one, then timed steps.
        precision: ``compute.precision`` (the benchmark's dtype on a GPU, fp32 on the CPU).
    """

    preset: str
    arch: str | None
    batch: int
    img_size: int
    local_size: int
    local_crops: int
    patch_size: int
    drop_path: float
    warmup: int
    steps: int
    precision: str = "bf16"

    @property
    def label(self) -> str:
        return LABELS[self.arch] if self.arch else "tiny ViT"

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    @property
    def name(self) -> str:
        local = f" + {self.local_crops}x{self.local_size}" if self.local_crops else ""
        return f"{self.preset} batch {self.batch}: 2x{self.img_size}{local} px"


@dataclass(frozen=True)
class Options:
    """The train-step benchmark's command-line options (``--arch``, ``--batch``, ``--img-size``,
    ``--drop-path``); None leaves the default of the mode the run is in.

    Raises:
        ValueError: an unknown arch, a batch below 2 (KoLeo needs two images), an image size
            below 1, a drop rate outside [0, 1); from :meth:`resolve`, an image size that is not a
            multiple of the preset's patch size.
    """

    arch: str | None = None
    batch: int | None = None
    img_size: int | None = None
    drop_path: float | None = None

    def __post_init__(self) -> None:
        if self.arch is not None and self.arch not in PRESETS:
            raise ValueError(f"--arch must be one of {', '.join(PRESETS)}, got {self.arch!r}")
        if self.batch is not None and self.batch < 2:
            raise ValueError(
                f"--batch must be at least 2 for train-step (the KoLeo loss compares images of a "
                f"batch), got {self.batch}"
            )
        if self.img_size is not None and self.img_size < 1:
            raise ValueError(f"--img-size must be positive, got {self.img_size}")
        if self.drop_path is not None and not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"--drop-path must be in [0, 1), got {self.drop_path:g}")

    def given(self) -> bool:
        return any(value is not None for value in dataclasses.astuple(self))

    def resolve(self, *, quick: bool, on_gpu: bool) -> Config:
        """The configuration to run: the preset of ``arch`` (default ``vit_large``; with
        ``quick`` or off a GPU the ``demo`` preset unless an arch is given), the options given,
        the rest from :data:`DEFAULTS` (:data:`SMALL` with ``quick`` or off a GPU) and the
        preset."""
        from dinov2_fast.train.config import load_config

        small = quick or not on_gpu
        defaults = {**DEFAULTS, **(SMALL if small else {})}
        arch = self.arch if self.arch is not None or small else defaults["arch"]
        preset = PRESETS[arch] if arch is not None else TINY_PRESET
        cfg = load_config(preset)
        patch = int(cfg.student.patch_size)
        img_size = self.img_size
        if img_size is None:  # the demo preset's own crops, or 224 px
            img_size = (
                defaults["img_size"] if arch is not None else int(cfg.crops.global_crops_size)
            )
        if img_size % patch:
            raise ValueError(
                f"--img-size must be a multiple of the patch size {patch} of the {preset} preset, "
                f"got {img_size}"
            )
        return Config(
            preset=preset,
            arch=arch,
            batch=self.batch if self.batch is not None else defaults["batch"],
            img_size=img_size,
            local_size=int(cfg.crops.local_crops_size),
            local_crops=int(cfg.crops.local_crops_number),
            patch_size=patch,
            drop_path=float(
                self.drop_path if self.drop_path is not None else cfg.student.drop_path_rate
            ),
            warmup=SMALL_WARMUP if small else GPU_WARMUP,
            steps=SMALL_STEPS if small else GPU_STEPS,
        )


def parse_shapes(text: str) -> list[Options]:
    """The train-step benchmark takes no ``--shapes``: ValueError saying what it takes instead."""
    raise ValueError("train-step takes --arch, --batch, --img-size and --drop-path, not --shapes")


# --- providers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Provider:
    """One implementation of the trainer.

    Attributes:
        name: its name in tables and results.
        impl: ``compute.impl`` (``fast``, ``baseline``, ``stock``).
        description: one line on what it runs.
        backend: ``compute.backend`` for our kernels (None: a comparison, not ours).
        compiles: every ViT block under torch.compile (on the CPU only with ``--compile``).
    """

    name: str
    impl: str
    description: str
    backend: str | None = None
    compiles: bool = False
    gpu_kernel: bool = False
    library: str | None = None


PROVIDERS: tuple[Provider, ...] = (
    Provider(
        "fast",
        "fast",
        "dinov2-fast: fused kernels, crops packed in one pass, subset drop path",
        backend="auto",
    ),
    Provider(
        "baseline",
        "baseline",
        "stock PyTorch as the iBOT code ran it: explicit attention, nn.LayerNorm, mask drop path, "
        "one forward per crop resolution",
    ),
    Provider(
        "fast/triton",
        "fast",
        "fast with compute.backend=triton: the Triton kernels everywhere",
        backend="triton",
        gpu_kernel=True,
    ),
    Provider(
        "fast/cuda",
        "fast",
        "fast with compute.backend=cuda: the compiled CUDA kernels (the heads' loss, which has "
        "none, takes auto)",
        backend="cuda",
        gpu_kernel=True,
    ),
    Provider(
        "stock+compile",
        "stock",
        "the baseline with SDPA attention and every ViT block under torch.compile",
        compiles=True,
    ),
    Provider(
        "fast+compile",
        "fast",
        "fast with every ViT block under torch.compile",
        backend="auto",
        compiles=True,
    ),
)
_ORDER = {provider.name: i for i, provider in enumerate(PROVIDERS)}
# The ops the fast backbone runs with compute.backend (the heads' loss falls back to auto).
BACKBONE_OPS = ("attention", "layer_norm", "index_select_cat", "scaled_index_add")
BASELINE = "baseline"
STOCK_COMPILED = "stock+compile"


def provider_status(
    provider: Provider,
    device: torch.device,
    dtype: torch.dtype,
    config: Config | None = None,
    *,
    compile_on_cpu: bool = False,
) -> tuple[str, str]:
    """``("ok", "")`` when ``provider`` can run here, else ``("skipped" | "not timed", why)``
    (torch.compile on the CPU needs ``--compile``; a backend named by a provider must run here
    and have a kernel for every op of the backbone)."""
    status = common.availability(provider, device, compile_on_cpu=compile_on_cpu)
    if status[0] != "ok" or provider.backend in (None, "auto"):
        return status
    from dinov2_fast import _backend

    missing = [op for op in BACKBONE_OPS if provider.backend not in _backend.AUTO_PREFERENCE[op]]
    if missing:
        return "skipped", f"no {provider.backend} kernel yet for {', '.join(missing)}"
    return "ok", ""


def _precision(device: torch.device, dtype: torch.dtype) -> str:
    """``compute.precision``: the benchmark's dtype on a GPU, fp32 on the CPU."""
    return dtype_name(dtype) if device.type == "cuda" else "fp32"


def training_config(config: Config, provider: Provider):
    """The trainer's configuration of ``provider`` at ``config`` (the preset and its overrides)."""
    from dinov2_fast.train.config import load_config

    overrides = [
        f"compute.impl={provider.impl}",
        f"compute.precision={config.precision}",
        f"compute.compile={'true' if provider.compiles else 'false'}",
        f"student.drop_path_rate={config.drop_path}",
        f"train.batch_size_per_gpu={config.batch}",
        f"crops.global_crops_size={config.img_size}",
        "train.num_workers=0",
    ]
    if provider.backend is not None:
        overrides.append(f"compute.backend={provider.backend}")
    return load_config(config.preset, overrides)


# --- the batch -----------------------------------------------------------------------------------


def make_batch(config: Config, device: torch.device) -> dict[str, Any]:
    """One synthetic collated batch of ``config`` on ``device`` (see the module docstring):
    seeded random crops, fp32, ``collated_global_crops [2B, 3, S, S]``, ``collated_local_crops
    [nB, 3, s, s]``, and the iBOT masks, indices and weights of ``collate_data_and_cast`` with the
    preset's mask settings and the trainer's mask generator."""
    from dinov2_fast.train.config import load_config
    from dinov2_fast.train.masking import collate_data_and_cast
    from dinov2_fast.train.trainer import make_mask_generator

    # The preset's mask settings and sizes (no override of the benchmark changes the masks).
    cfg = load_config(config.preset, [f"crops.global_crops_size={config.img_size}"])
    generator = torch.Generator().manual_seed(SEED)
    big, small = config.img_size, config.local_size
    samples = [
        {
            "global_crops": [torch.randn(3, big, big, generator=generator) for _ in range(2)],
            "local_crops": [
                torch.randn(3, small, small, generator=generator) for _ in range(config.local_crops)
            ],
        }
        for _ in range(config.batch)
    ]
    side = big // config.patch_size
    batch = collate_data_and_cast(
        samples,
        mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=cfg.ibot.mask_sample_probability,
        n_tokens=side * side,
        mask_generator=make_mask_generator(cfg),
        generator=generator,
    )
    return {
        key: value.to(device) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
    }


# --- measuring -----------------------------------------------------------------------------------


def _record(
    provider: Provider, config: Config, pass_: str, status: str, dtype: torch.dtype, **fields
) -> Record:
    """A record of ``provider`` at ``config``; its dtype is the precision the trainer ran at
    (``dtype``, the benchmark's, is not: fp32 on the CPU)."""
    defaults = {
        "preset": config.preset,
        "arch": config.arch,
        "label": config.label,
        "impl": provider.impl,
        "compiled": provider.compiles,
        "batch": config.batch,
        "img_size": config.img_size,
        "local_size": config.local_size,
        "local_crops": config.local_crops,
        "patch_size": config.patch_size,
        "drop_rate": config.drop_path,
        "warmup_steps": config.warmup,
        "steps": None,
        "ms_min": None,
        "ms_max": None,
        "images_per_s": None,
        "peak_MiB": None,
        "resident_MiB": None,
        "params_MiB": None,
        "optimizer_MiB": None,
        "build_s": None,
        "first_call_s": None,
        "loss": None,
        "losses": None,
        "memory_ratio": None,
        "vs_stock_compile": None,
        "baseline": BASELINE,
    }
    return common.new_record(
        "train-step", provider, pass_, config.name, status, config.dtype, {**defaults, **fields}
    )


class _NonFinite(Exception):
    """A step's losses were not all finite: ``step`` and ``losses`` as the trainer's
    ``NonFiniteLossError`` has them."""

    def __init__(self, step: int, losses: dict[str, float]) -> None:
        super().__init__(step, losses)
        self.step, self.losses = step, losses


def _failed_note(error: Exception) -> str:
    """ "FAILED: non-finite loss at step S: name=value, ..." of a non-finite loss error."""
    losses = ", ".join(f"{name}={value:.4g}" for name, value in error.losses.items())
    return f"FAILED: non-finite loss at step {error.step}: {losses}"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tensor_mib(tensors: Iterator[torch.Tensor]) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _optimizer_mib(optimizer: torch.optim.Optimizer) -> float:
    return _tensor_mib(
        value
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


def _timed_steps(step, device: torch.device, first: int, count: int) -> list[float]:
    """The ms of ``count`` calls of ``step(i)``, ``i`` from ``first``: CUDA events around each
    on a GPU, the wall clock (after a sync) elsewhere."""
    if device.type == "cuda":
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(count)
        ]
        for i, (start, end) in enumerate(events):
            start.record()
            step(first + i)
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for i in range(count):
        start = time.perf_counter()
        step(first + i)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _measure(
    context: BenchContext,
    provider: Provider,
    config: Config,
    batch: dict[str, Any],
) -> list[Record]:
    """One provider's record (see ``common.measure_passes``: an exception becomes an error)."""
    device, dtype = context.device, config.dtype

    def body() -> Iterator[Record]:
        left = context.seconds_left()
        if provider.compiles and left is not None and left < COMPILE_RESERVE_S:
            yield _record(provider, config, PASS, "skipped", dtype, note=OUT_OF_TIME_COMPILE)
            return
        from dinov2_fast.train.trainer import NonFiniteLossError, build_training, training_step

        context.say(f"train-step {config.name} {provider.name}")
        cfg = training_config(config, provider)
        if provider.compiles:
            torch._dynamo.reset()
        training = model = None
        resident = 0
        try:
            start = time.perf_counter()
            # Built on the device directly (not on the CPU, then copied): the same seeded weights
            # for every provider, in a fraction of the time for the big models.
            with torch.device(device):
                training = build_training(cfg, device)
            _synchronize(device)
            build_s = time.perf_counter() - start
            training.model.train()

            def step(i: int) -> dict[str, torch.Tensor]:
                return training_step(training, batch, i)

            torch.manual_seed(SEED)  # the same drop-path draws for every provider
            try:
                start = time.perf_counter()
                losses = step(0)  # compiles what needs compiling
                _synchronize(device)
                first_call_s = time.perf_counter() - start
                values = {name: float(value) for name, value in losses.items()}
                if not all(math.isfinite(value) for value in values.values()):
                    raise _NonFinite(0, values)
                for i in range(1, 1 + config.warmup):
                    step(i)
                _synchronize(device)
                if device.type == "cuda":
                    resident = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                times = _timed_steps(step, device, 1 + config.warmup, config.steps)
            except (NonFiniteLossError, _NonFinite) as error:
                yield _record(provider, config, PASS, "error", dtype, note=_failed_note(error))
                return
            peak = resident_mib = None
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) / 2**20
                resident_mib = resident / 2**20
            model = training.model
            ms = statistics.median(times)
            yield _record(
                provider,
                config,
                PASS,
                "ok",
                dtype,
                ms=ms,
                ms_min=min(times),
                ms_max=max(times),
                steps=len(times),
                images_per_s=config.batch / (ms * 1e-3),
                peak_MiB=peak,
                resident_MiB=resident_mib,
                params_MiB=_tensor_mib(
                    t for part in (model.parameters(), model.buffers()) for t in part
                ),
                optimizer_MiB=_optimizer_mib(training.optimizer),
                build_s=build_s,
                first_call_s=first_call_s,
                loss=values.get("total_loss"),
                losses=values,
                check="ok",
            )
        finally:
            training = model = None
            gc.collect()
            if provider.compiles:
                torch._dynamo.reset()  # the compiled graphs hold on to the model

    return common.measure_passes(context, provider, config, body(), _record, passes=(PASS,))


def _finish(records: list[Record]) -> None:
    """Provider order; each timed record's ratios: ``speedup`` (baseline's ms over this one's),
    ``memory_ratio`` (this peak over baseline's) and ``vs_stock_compile`` (stock+compile's ms over
    this one's)."""
    records.sort(key=lambda r: _ORDER[r["provider"]])
    common.add_speedups(records)
    timed = {r["provider"]: r for r in records if r["status"] == "ok"}
    base, stock = timed.get(BASELINE), timed.get(STOCK_COMPILED)
    for record in timed.values():
        if base is not None and base["peak_MiB"] and record["peak_MiB"] is not None:
            record["memory_ratio"] = record["peak_MiB"] / base["peak_MiB"]
        if stock is not None:
            record["vs_stock_compile"] = stock["ms"] / record["ms"]


def run(
    context: BenchContext, shapes: Sequence[Options] | None = None
) -> tuple[list[Record], list[str]]:
    """Time every provider's training step. ``shapes``: the :class:`Options` of the command line
    (None: the defaults). Returns (records, notes)."""
    on_gpu = context.device.type == "cuda"
    precision = _precision(context.device, context.dtype)
    configs = [
        dataclasses.replace(
            options.resolve(quick=context.quick, on_gpu=on_gpu), precision=precision
        )
        for options in (shapes or [Options()])
    ]
    notes = [
        "synthetic data: one collated batch (seeded random crops and iBOT masks) built once on "
        "the device and reused by every step; no data loading, augmentation or copy to the "
        "device is timed",
        "a step is the trainer's whole step (teacher, student, heads, losses, backward, clipping, "
        "AdamW, EMA) and ends with its finite-loss check, one host sync",
    ]
    if context.quick or not on_gpu:
        where = "--quick" if context.quick else "no GPU"
        notes.append(
            f"{where}: unless --arch is given, the {TINY_PRESET} preset's tiny ViT, batch "
            f"{SMALL['batch']}, {SMALL_WARMUP} warm-up and {SMALL_STEPS} timed steps; the "
            "numbers are not meaningful, they only show that the benchmark runs"
        )
    if not on_gpu:
        notes.append(
            "on the CPU: fp32, the fast implementation runs the torch reference of dinov2-fast's "
            "ops, and no memory is measured"
        )
    records: list[Record] = []
    for config in configs:
        batch = make_batch(config, context.device)
        records += common.run_providers(
            context,
            [config],
            PROVIDERS,
            status=provider_status,
            measure=functools.partial(_measure, batch=batch),
            record=_record,
            finish_shape=_finish,
            passes=(PASS,),
        )
        del batch
    return records, notes


# --- tables --------------------------------------------------------------------------------------


def _describe(record: Record) -> str:
    local = (
        f" + {record['local_crops']} local crops at {record['local_size']} px"
        if record["local_crops"]
        else ""
    )
    return (
        f"{record['label']} ({record['preset']} preset), {record['batch']} images a step: 2 global "
        f"crops at {record['img_size']} px{local}, drop path {record['drop_rate']:g}, "
        f"{record['dtype']}"
    )


def _mib(value: float | None) -> str:
    return common.number(value, 0)


def _cells(record: Record) -> list[str]:
    steps = "-" if record["steps"] is None else str(record["steps"])
    return [
        record["provider"],
        common.number(record["ms"], 1),
        common.number(record["images_per_s"], 1),
        _mib(record["peak_MiB"]),
        _mib(record["resident_MiB"]),
        _mib(record["params_MiB"]),
        _mib(record["optimizer_MiB"]),
        common.speedup(record["speedup"]),
        common.speedup(record["memory_ratio"]),
        common.speedup(record["vs_stock_compile"]),
        common.number(record["loss"], 4),
        common.number(record["first_call_s"], 1),
        steps,
        record["note"],
    ]


def table(records: Sequence[Record]) -> Table:
    """One row per timed (or failed) provider; skipped ones are listed under it."""
    described = list(dict.fromkeys(_describe(r) for r in records))
    result = common.provider_table(
        "DINOv2 training step (teacher, student, heads, losses, AdamW, EMA): "
        + "; ".join(described)
        + " (median step)",
        [
            "provider",
            "ms",
            "images/s",
            "peak MiB",
            "resident MiB",
            "params MiB",
            "AdamW MiB",
            "vs baseline",
            "memory vs baseline",
            "vs stock+compile",
            "loss",
            "first s",
            "steps",
            "note",
        ],
        records,
        _cells,
        passes=(PASS,),
        order=lambda r: (r["shape"], _ORDER.get(r["provider"], 99)),
    )
    result.notes.append(
        "peak MiB: the most allocated during the timed steps, weights and optimizer state "
        "included; resident MiB: allocated between steps (weights, teacher, AdamW state, "
        "gradients, the batch); vs baseline / vs stock+compile: their ms over this one's (above "
        "1: faster); memory vs baseline: this peak over baseline's (below 1: less); loss: the "
        "first step's total loss; first s: the first step, compile included"
    )
    return result


def _on_target_config(record: Record) -> bool:
    return (record["arch"], record["batch"], record["img_size"]) == TARGET_CONFIG


def _verdict(record: Record, base: Record | None, stock: Record | None) -> str:
    """ "targets met", or what was missed ("missed: ..."), or why there is no verdict."""
    if base is None:
        return "no verdict: baseline not timed"
    misses = []
    if record["speedup"] is not None and record["speedup"] < TARGET_SPEEDUP:
        misses.append(f"speed {record['speedup']:.2f}x < {TARGET_SPEEDUP:g}x")
    if record["memory_ratio"] is None:
        misses.append("no memory measured")
    elif record["memory_ratio"] > TARGET_MEMORY:
        misses.append(f"memory {record['memory_ratio']:.2f}x > 1/3")
    if stock is not None and record["vs_stock_compile"] < TARGET_VS_STOCK:
        misses.append(f"vs stock+compile {record['vs_stock_compile']:.2f}x < {TARGET_VS_STOCK:g}x")
    if misses:
        return "missed: " + "; ".join(misses)
    if stock is None:
        return "baseline targets met; stock+compile not timed"
    return "targets met"


def headline(records: Sequence[Record]) -> Table | None:
    """Every timed provider's images/s and peak memory, ``fast`` (and ``fast+compile``) held
    against the targets: >= 2x baseline's images/s at <= 1/3 of its peak memory, and >= 1.2x
    stock+compile's images/s. None if no implementation of ours was timed."""
    result = Table(
        "Training step against the targets (>= 2x baseline's images/s at <= 1/3 of its peak "
        "memory, and >= 1.2x stock+compile's images/s): "
        + "; ".join(dict.fromkeys(_describe(r) for r in records if r["status"] == "ok")),
        [
            "provider",
            "ms",
            "images/s",
            "peak GiB",
            "vs baseline",
            "memory vs baseline",
            "vs stock+compile",
            "verdict",
        ],
    )
    configs = list(dict.fromkeys(r["shape"] for r in records))
    off_target = False
    for config in configs:
        timed = {r["provider"]: r for r in records if r["shape"] == config and r["status"] == "ok"}
        failed = [r for r in records if r["shape"] == config and r["status"] == "error"]
        base, stock = timed.get(BASELINE), timed.get(STOCK_COMPILED)
        for record in sorted(timed.values(), key=lambda r: _ORDER.get(r["provider"], 99)):
            verdict = _verdict(record, base, stock) if record["ours"] else ""
            if record["ours"] and not _on_target_config(record):
                off_target = True
            peak = record["peak_MiB"]
            result.rows.append(
                [
                    record["provider"],
                    common.number(record["ms"], 1),
                    common.number(record["images_per_s"], 1),
                    common.number(None if peak is None else peak / 1024, 2),
                    common.speedup(record["speedup"]),
                    common.speedup(record["memory_ratio"]),
                    common.speedup(record["vs_stock_compile"]),
                    verdict,
                ]
            )
        for record in failed:
            note = record["note"]
            if not note.startswith("FAILED"):
                note = f"{'FAILED' if record['ours'] else 'failed'}: {note}"
            result.rows.append([record["provider"], *["-"] * 6, note])
    if not any(
        row[0] in {p.name for p in PROVIDERS if p.backend is not None} for row in result.rows
    ):
        return None
    result.notes.append(
        "vs: the other provider's ms over this one's (above 1: faster); memory vs baseline: this "
        "peak over baseline's (below 1: less); peak: the absolute peak of the timed steps"
    )
    if off_target:
        result.notes.append(
            "the targets are set for ViT-L/14 (vit_large), 32 images a step, 224 px global crops, "
            "on one H100; this run's configuration differs"
        )
    return result


# --- the plot ------------------------------------------------------------------------------------


def check_plot_path(path: str) -> None:
    """ValueError unless ``path`` ends in one of :data:`PLOT_FORMATS`; ImportError (saying how to
    install it) without matplotlib."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in PLOT_FORMATS:
        raise ValueError(
            f"--plot PATH must end in .{', .'.join(PLOT_FORMATS)} (the format), got {path!r}"
        )
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "--plot needs matplotlib: pip install matplotlib (or pip install 'dinov2-fast[train]')"
        ) from error


def plot(report: dict[str, Any], path: str) -> Path:
    """A bar chart of a train-step report (as ``bench --json`` writes it) saved to ``path``
    (its format from the extension, :data:`PLOT_FORMATS`): images/s and peak memory per provider,
    side by side, with the targets drawn against baseline. Uses matplotlib's Agg canvas (no
    display, no pyplot state).

    Raises:
        ValueError: a bad extension, or no timed train-step provider in the report.
        ImportError: matplotlib is not installed.
    """
    check_plot_path(path)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = [
        r for r in report["results"] if r["benchmark"] == "train-step" and r["status"] == "ok"
    ]
    if not records:
        raise ValueError("no train-step provider was timed: nothing to plot")
    shape = records[0]["shape"]
    records = sorted(
        (r for r in records if r["shape"] == shape), key=lambda r: _ORDER.get(r["provider"], 99)
    )
    names = [r["provider"] for r in records]
    colors = ["tab:orange" if r["ours"] else "tab:gray" for r in records]
    base = next((r for r in records if r["provider"] == BASELINE), None)

    figure = Figure(figsize=(11, 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    speed_axes, memory_axes = figure.subplots(1, 2)

    speeds = [r["images_per_s"] for r in records]
    bars = speed_axes.bar(names, speeds, color=colors)
    speed_axes.bar_label(
        bars,
        labels=[
            f"{r['images_per_s']:.1f}"
            + ("" if r["speedup"] is None else f"\n{r['speedup']:.2f}x base")
            for r in records
        ],
        fontsize=8,
    )
    speed_axes.set_ylabel("images / s (higher is better)")
    speed_axes.set_title("throughput")
    stock = next((r for r in records if r["provider"] == STOCK_COMPILED), None)
    for reference, factor, color in (
        (base, TARGET_SPEEDUP, "tab:green"),
        (stock, TARGET_VS_STOCK, "tab:purple"),
    ):
        if reference is not None:
            speed_axes.axhline(
                factor * reference["images_per_s"],
                color=color,
                linestyle="--",
                label=f"target: {factor:g}x {reference['provider']}",
            )
    if base is not None or stock is not None:
        speed_axes.legend(loc="upper left", fontsize=8)
    speed_axes.margins(y=0.2)

    peaks = [r["peak_MiB"] for r in records]
    if all(peak is None for peak in peaks):
        memory_axes.text(
            0.5,
            0.5,
            "no memory measured\n(not a GPU run)",
            ha="center",
            va="center",
            transform=memory_axes.transAxes,
        )
        memory_axes.set_xticks([])
        memory_axes.set_yticks([])
    else:
        gib = [0.0 if peak is None else peak / 1024 for peak in peaks]
        bars = memory_axes.bar(names, gib, color=colors)
        memory_axes.bar_label(
            bars,
            labels=[
                "-"
                if r["peak_MiB"] is None
                else f"{r['peak_MiB'] / 1024:.1f}"
                + ("" if r["memory_ratio"] is None else f"\n{r['memory_ratio']:.2f}x base")
                for r in records
            ],
            fontsize=8,
        )
        memory_axes.set_ylabel("peak GiB (lower is better)")
        if base is not None and base["peak_MiB"]:
            memory_axes.axhline(
                TARGET_MEMORY * base["peak_MiB"] / 1024,
                color="tab:green",
                linestyle="--",
                label="target: 1/3 of baseline",
            )
            memory_axes.legend(loc="upper right", fontsize=8)
        memory_axes.margins(y=0.2)
    memory_axes.set_title("peak memory")
    for axes in (speed_axes, memory_axes):
        axes.tick_params(axis="x", labelsize=8)
    figure.suptitle(
        f"DINOv2 training step on {report.get('device', '?')}\n{_describe(records[0])}",
        fontsize=9,
    )
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, format=target.suffix.lower().lstrip("."), dpi=120)
    return target


BENCHMARK = Benchmark(
    name="train-step",
    summary="the whole DINOv2 trainer's step (default ViT-L/14, 32 images: 2x224 + 8x98 px "
    "crops) for fast (auto, and per kernel backend), baseline and stock+compile; images/s, "
    "step time, peak memory",
    shapes_help="(not taken: --arch, --batch, --img-size, --drop-path instead)",
    parse_shapes=parse_shapes,
    run=run,
    table=table,
    headline=headline,
)
