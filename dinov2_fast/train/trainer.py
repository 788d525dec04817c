"""The training loop: data, the student/teacher step, schedules, checkpoints, metrics, summary.

``train(config, output_dir=...)`` runs on one CPU, one GPU, or under ``torchrun`` on many GPUs and
nodes (then the student and the teacher are sharded alike with :func:`dinov2_fast.fsdp.shard_model`).
Everything random is a function of the config's seed, the step and the rank: the data order
(:class:`~dinov2_fast.train.data.InfiniteShardedSampler`), each image's augmentation and masks
(seeded per image), and the drop-path draws (torch's RNG, saved in every checkpoint); so
``resume=True`` continues exactly where the last checkpoint left off, and an interrupted run loses
at most the steps since it. A non-finite loss stops the run with :class:`NonFiniteLossError`
before the optimizer step, and nothing is saved over the last good checkpoint.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dinov2_fast.train.config import Config, save_config

__all__ = [
    "NonFiniteLossError",
    "TrainSummary",
    "Training",
    "build_training",
    "make_mask_generator",
    "train",
    "training_step",
]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the losses."""

    def __init__(self, step: int, losses: dict[str, float]) -> None:
        self.step = step
        self.losses = losses
        parts = ", ".join(f"{name}={value:.4g}" for name, value in losses.items())
        super().__init__(
            f"non-finite loss at step {step} ({parts}); the run stopped before the optimizer step "
            "and saved nothing over the last checkpoint. Lower optim.base_lr, raise "
            "teacher.warmup_teacher_temp_epochs or use compute.precision=fp32 to investigate."
        )


@dataclass
class TrainSummary:
    """What the run measured: steps, images per second and step time (the first steps, which
    compile and warm up, excluded), and peak memory (GPU memory on a GPU, peak RSS on a CPU)."""

    impl: str
    device: str
    world_size: int
    steps: int
    images_per_step: int
    images_per_s: float
    step_time_s: float
    peak_memory_MiB: float
    memory_kind: str
    final_loss: float
    output_dir: str
    knn_before: float | None = None
    knn_after: float | None = None
    unreadable_files: int = 0
    rank: int = 0

    def lines(self) -> list[str]:
        out = [
            f"impl {self.impl} on {self.device} x{self.world_size}: {self.steps} steps of "
            f"{self.images_per_step} images",
            f"{self.images_per_s:.1f} images/s, {self.step_time_s * 1000:.1f} ms a step, peak "
            f"{self.memory_kind} {self.peak_memory_MiB:.0f} MiB, final loss {self.final_loss:.4f}",
        ]
        if self.knn_after is not None:
            out.append(
                f"k-NN accuracy of the teacher: {self.knn_before:.1f}% before training, "
                f"{self.knn_after:.1f}% after"
            )
        if self.unreadable_files:
            out.append(f"{self.unreadable_files} unreadable image files were skipped (see above)")
        out.append(f"checkpoints, config and metrics in {self.output_dir}")
        return out


# --- set-up --------------------------------------------------------------------------------------


def _setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device): torchrun's environment when there is one (a process group
    even for one process, so that ``torchrun --nproc_per_node=1`` trains sharded too)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _dataset(cfg: Config, data: str | None):
    from dinov2_fast.train import data as data_module

    source = data if data is not None else cfg.train.dataset
    if source is None:
        raise ValueError(
            "no training data: pass --data DIR (a folder of images), or train.dataset=digits "
            "(scikit-learn's bundled digits) or train.dataset=synthetic"
        )
    if source == "digits":
        return data_module.DigitsDataset("train")
    if source == "synthetic":
        return data_module.SyntheticDataset(
            100_000, cfg.crops.global_crops_size, seed=cfg.train.seed
        )
    return data_module.ImageFolder(source)


def make_mask_generator(cfg: Config):
    """iBOT's block masking over the global crops' patch grid, with DINOv2's cap on one mask
    (its expression, precedence included: ``0.5 * size // patch * size // patch``)."""
    from dinov2_fast.train.masking import MaskingGenerator

    size, patch = cfg.crops.global_crops_size, cfg.student.patch_size
    side = size // patch
    return MaskingGenerator(input_size=(side, side), max_num_patches=0.5 * size // patch * side)


def _data_loader(cfg: Config, dataset, *, rank: int, world: int, start_step: int, device):
    from dinov2_fast.train.augment import MultiCropAugmentation
    from dinov2_fast.train.data import InfiniteShardedSampler, SSLDataset, make_data_loader
    from dinov2_fast.train.masking import MultiCropCollate

    crops = cfg.crops
    augmentation = MultiCropAugmentation(
        global_crops_scale=tuple(crops.global_crops_scale),
        local_crops_scale=tuple(crops.local_crops_scale),
        local_crops_number=crops.local_crops_number,
        global_crops_size=crops.global_crops_size,
        local_crops_size=crops.local_crops_size,
    )
    side = crops.global_crops_size // cfg.student.patch_size
    collate = MultiCropCollate(
        mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=cfg.ibot.mask_sample_probability,
        n_tokens=side * side,
        mask_generator=make_mask_generator(cfg),
    )
    batch = cfg.train.batch_size_per_gpu
    sampler = InfiniteShardedSampler(
        len(dataset), seed=cfg.train.seed, rank=rank, world_size=world, start=start_step * batch
    )
    return make_data_loader(
        SSLDataset(dataset, augmentation, seed=cfg.train.seed),
        batch_size=batch,
        num_workers=cfg.train.num_workers,
        pin_memory=device.type == "cuda",
        sampler=sampler,
        collate_fn=collate,
    )


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
    }


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "GPU memory"
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss_kib / 1024, "RSS"


# --- the model, the optimizer and one step --------------------------------------------------------


@dataclass
class Training:
    """What a step needs: the model (student, teacher, loss centers), the optimizer, the
    schedules, the compute context (autocast on one device; FSDP's param dtype when sharded), and
    the gradient clip."""

    model: Any
    optimizer: torch.optim.Optimizer
    schedules: Any
    autocast: Any
    clip_grad: float
    images_per_step: int


def build_training(
    cfg: Config, device: torch.device, world: int = 1, *, sharded: bool | None = None
) -> Training:
    """The model of ``cfg.compute.impl`` on ``device`` (sharded alike for student and teacher when
    ``sharded``, by default when a process group is initialised), AdamW over DINOv2's parameter
    groups, the schedules with the lr scaled by
    ``optim.scaling_rule``. The initial weights depend only on ``train.seed``."""
    from dinov2_fast.fsdp import shard_model
    from dinov2_fast.train.meta_arch import SSLMetaArch
    from dinov2_fast.train.param_groups import fuse_params_groups, get_params_groups_with_decay
    from dinov2_fast.train.schedules import build_schedules

    precision = cfg.compute.precision
    if precision not in _DTYPES:
        raise ValueError(
            f"compute.precision must be one of {', '.join(_DTYPES)}, got {precision!r}"
        )
    dtype = _DTYPES[precision]
    if cfg.compute.backend == "cuda" and dtype == torch.float32:
        raise ValueError(
            "compute.backend=cuda needs compute.precision bf16 or fp16: the CUDA attention kernels "
            "take 16-bit inputs; use compute.backend=triton (or auto) to train in fp32"
        )
    batch_size = cfg.train.batch_size_per_gpu
    if batch_size < 2:
        raise ValueError(f"train.batch_size_per_gpu must be at least 2 (KoLeo), got {batch_size}")

    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank and every impl
    model = SSLMetaArch(cfg).to(device)
    if sharded is None:
        sharded = dist.is_initialized()
    if sharded:
        param_dtype = None if dtype == torch.float32 else dtype
        for part in (model.student, model.teacher):
            shard_model(
                part,
                param_dtype=param_dtype,
                activation_checkpointing=cfg.compute.activation_checkpointing,
                split_precision=True,
                compile_blocks=cfg.compute.compile,
            )
    else:
        if cfg.compute.activation_checkpointing:
            from dinov2_fast.fsdp import checkpoint_blocks

            checkpoint_blocks(model.student)
        if cfg.compute.compile:
            for block in _blocks(model):
                block.compile()
    autocast = (
        torch.autocast(device.type, dtype=dtype)
        if not sharded and dtype != torch.float32
        else nullcontext()
    )

    optim = cfg.optim
    groups = []
    for part in model.student.values():
        groups += get_params_groups_with_decay(
            part, lr_decay_rate=optim.layerwise_decay, patch_embed_lr_mult=optim.patch_embed_lr_mult
        )
    optimizer = torch.optim.AdamW(
        fuse_params_groups(groups), betas=(optim.adamw_beta1, optim.adamw_beta2)
    )
    return Training(
        model=model,
        optimizer=optimizer,
        schedules=build_schedules(cfg, world_size=world),  # lr scaled by optim.scaling_rule
        autocast=autocast,
        clip_grad=optim.clip_grad,
        images_per_step=batch_size * world,
    )


def training_step(training: Training, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
    """One step on a batch already on the device: the schedules' values for ``step``, the
    forward and backward, the loss check, clipping, the optimizer step and the teacher's EMA.
    Returns the losses as tensors (no host sync); raises :class:`NonFiniteLossError` before the
    optimizer step when one is not finite (one sync: the check)."""
    from dinov2_fast.train.param_groups import apply_optim_scheduler

    values = training.schedules.at(step)
    apply_optim_scheduler(training.optimizer, values.lr, values.wd, values.last_layer_lr)
    training.optimizer.zero_grad(set_to_none=True)
    with training.autocast:
        losses = training.model.forward_backward(batch, teacher_temp=values.teacher_temp)
    finite = torch.isfinite(losses["total_loss"]).float()
    if dist.is_initialized() and dist.get_world_size() > 1:  # every rank stops, or none
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not bool(finite):
        raise NonFiniteLossError(step, {k: float(v) for k, v in losses.items()})
    if training.clip_grad:
        training.model.clip_gradients(training.clip_grad)
    training.optimizer.step()
    training.model.update_teacher(values.momentum)
    return losses


# --- the loop ------------------------------------------------------------------------------------


_FSDP2_VIEW_OUTPUT = r"FSDP2-wrapped module \(.*\) returned a view tensor"


def train(
    cfg: Config,
    *,
    output_dir: str | Path,
    data: str | None = None,
    resume: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
) -> TrainSummary:
    """Train ``cfg`` (see :func:`dinov2_fast.train.config.load_config`), writing ``config.yaml``,
    ``checkpoints/``, ``training_metrics.jsonl`` and ``summary.json`` under ``output_dir``.

    Args:
        data: a folder of images (overrides ``train.dataset``).
        resume: continue from the latest checkpoint in ``output_dir`` (none: start afresh).
        max_steps: stop after this many steps (the schedules still span the configured epochs,
            so a short run is the start of the full one).
        progress: a progress bar on rank 0.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite.
        ValueError: a bad configuration value (named).
    """
    created = not dist.is_initialized()
    rank, world, device = _setup_distributed()
    created = created and dist.is_initialized()
    try:
        with warnings.catch_warnings():
            # Our sharded blocks and backbones return views (the packed groups split from one
            # sequence, the token slices of the final norm), which FSDP2 warns about because an
            # in-place op on one would skip its pre-backward hook; nothing in the step does that.
            warnings.filterwarnings("ignore", message=_FSDP2_VIEW_OUTPUT, category=UserWarning)
            return _train(cfg, output_dir, data, resume, max_steps, progress, rank, world, device)
    finally:
        if created:  # ours to close: pending collectives end before the process does
            dist.barrier()
            dist.destroy_process_group()


def _train(cfg, output_dir, data, resume, max_steps, progress, rank, world, device) -> TrainSummary:
    from dinov2_fast.fsdp import latest_checkpoint, load_checkpoint, save_checkpoint

    output_dir = Path(output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    dataset = _dataset(cfg, data)  # first: a bad --data fails before any model is built
    training = build_training(cfg, device, world)
    model, optimizer = training.model, training.optimizer
    if rank == 0:
        save_config(cfg, output_dir / "config.yaml")
    total_steps = cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH
    end_step = total_steps if max_steps is None else min(max_steps, total_steps)

    start_step = 0
    if not resume and rank == 0:
        (output_dir / "training_metrics.jsonl").unlink(missing_ok=True)
    state = None
    if resume and latest_checkpoint(checkpoint_dir) is not None:
        state = load_checkpoint(checkpoint_dir, model=model, optimizer=optimizer)
        start_step = int(state["step"])
    if state is None:  # a resume restored every rank's RNG states (on the same world size)
        torch.manual_seed(cfg.train.seed + 1 + rank)  # each rank its own drop-path draws
    loader = _data_loader(
        cfg, dataset, rank=rank, world=world, start_step=start_step, device=device
    )
    data_iter = iter(loader)

    knn_before = None
    if cfg.evaluation.knn_at_end and rank == 0 and start_step == 0:
        knn_before = _knn(model, cfg, device)

    metrics_path = output_dir / "training_metrics.jsonl"
    bar = _progress(progress and rank == 0, start_step, end_step)
    model.train()
    times: list[float] = []
    losses: dict[str, float] = {}
    unreadable: dict[str, str] = {}
    images_per_step = training.images_per_step
    step = start_step
    last = time.perf_counter()
    for step in range(start_step, end_step):
        batch = next(data_iter)
        unreadable.update(batch.pop("unreadable", None) or {})  # reported by the workers
        batch = _to_device(batch, device)
        data_time = time.perf_counter() - last
        step_losses = training_step(training, batch, step)
        losses = _reduce(step_losses, world)
        values = training.schedules.at(step)
        now = time.perf_counter()
        times.append(now - last)
        last = now
        done = step + 1
        if rank == 0 and (done % cfg.train.log_every == 0 or done == end_step):
            record = {
                "step": done,
                **losses,
                "lr": values.lr,
                "wd": values.wd,
                "momentum": values.momentum,
                "teacher_temp": values.teacher_temp,
                "step_time_s": times[-1],
                "data_time_s": data_time,
                "images_per_s": images_per_step / times[-1],
                "peak_memory_MiB": _peak_memory(device)[0],
            }
            with metrics_path.open("a") as stream:
                stream.write(json.dumps(record) + "\n")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                loss=f"{losses['total_loss']:.3f}",
                lr=f"{values.lr:.2e}",
                img_s=f"{images_per_step / times[-1]:.1f}",
            )
        every = cfg.train.checkpoint_every  # 0: no checkpoints (benchmark runs)
        if every > 0 and (done % every == 0 or done == end_step):
            _save(save_checkpoint, checkpoint_dir, done, model, optimizer, cfg)
    if bar is not None:
        bar.close()

    knn_after = _knn(model, cfg, device) if knn_before is not None else None
    measured = times[2:] if len(times) > 4 else times
    step_time = sum(measured) / max(len(measured), 1)
    peak, kind = _peak_memory(device)
    summary = TrainSummary(
        impl=model.impl,
        device=str(device),
        world_size=world,
        steps=end_step - start_step,
        images_per_step=images_per_step,
        images_per_s=images_per_step / step_time if step_time else 0.0,
        step_time_s=step_time,
        peak_memory_MiB=peak,
        memory_kind=kind,
        final_loss=losses.get("total_loss", float("nan")),
        output_dir=str(output_dir),
        knn_before=knn_before,
        knn_after=knn_after,
        unreadable_files=len(unreadable),
        rank=rank,
    )
    for criterion in (model.dino_loss, model.ibot_patch_loss):
        criterion.apply_center_update()  # no reduction left in flight
    if rank == 0:
        (output_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
    return summary


def _blocks(model):
    from dinov2_fast.patch import vit_blocks

    return [block for part in (model.student, model.teacher) for _, block in vit_blocks(part)]


def _reduce(losses: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    """The losses averaged over the ranks, as floats (one device sync a step)."""
    names = sorted(losses)
    stacked = torch.stack([losses[name].float() for name in names])
    if world > 1:
        dist.all_reduce(stacked)
        stacked /= world
    return dict(zip(names, stacked.tolist()))


def _save(save_checkpoint, directory, step, model, optimizer, cfg) -> None:
    """A checkpoint of the model (student, teacher, loss centers), the optimizer and the step;
    save_checkpoint adds every rank's RNG states, which a resume on the same world size restores."""
    save_checkpoint(
        directory, step, model=model, optimizer=optimizer, keep=cfg.train.keep_checkpoints
    )


def _progress(enabled: bool, start: int, end: int):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=end, initial=start, desc="train", unit="step", file=sys.stderr)


def _knn(model, cfg: Config, device: torch.device) -> float:
    """k-NN top-1 accuracy (%) of the teacher backbone's CLS features on the digits' test split
    against its train split, images resized to the global crop size."""
    from dinov2_fast.train.evaluate import evaluate_knn_digits

    return evaluate_knn_digits(
        model.teacher.backbone,
        image_size=cfg.crops.global_crops_size,
        device=device,
        k=cfg.evaluation.knn_k,
        temperature=cfg.evaluation.knn_temperature,
    )
