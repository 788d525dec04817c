"""DINOv2's per-iteration schedules: learning rate, weight decay, teacher momentum, teacher
temperature and the last layer's learning rate, and the ``sqrt_wrt_1024`` learning-rate scaling.

An "epoch" is ``train.OFFICIAL_EPOCH_LENGTH`` iterations whatever the dataset's size (DINOv2's
1250), so every length below is ``epochs × OFFICIAL_EPOCH_LENGTH`` iterations.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from dinov2_fast.train.losses import _world_size

__all__ = ["CosineScheduler", "ScheduleValues", "Schedules", "build_schedules", "scaled_lr"]


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


class CosineScheduler:
    """DINOv2's schedule over ``total_iters`` iterations: ``freeze_iters`` zeros, then
    ``warmup_iters`` values linear from ``start_warmup_value`` to ``base_value`` (both included,
    ``np.linspace``), then a half cosine from ``base_value`` down towards ``final_value``
    (``final + ½(base − final)(1 + cos(π·i/n))``, i = 0 … n−1). Any iteration at or past
    ``total_iters`` gives ``final_value``.

    ``sched[it]`` is a Python float; ``len(sched)`` is ``total_iters``; iterating yields the
    ``total_iters`` values. ``schedule`` is the float64 numpy array (DINOv2's attribute).

    Raises:
        ValueError: a negative or non-int length, ``freeze_iters + warmup_iters > total_iters``,
            a non-finite value; a negative or non-int iteration (IndexError is not used, so that
            ``sched[it]`` never ends an iteration by accident).
    """

    def __init__(
        self,
        base_value: float,
        final_value: float,
        total_iters: int,
        warmup_iters: int = 0,
        start_warmup_value: float = 0.0,
        freeze_iters: int = 0,
    ) -> None:
        base_value = _number("base_value", base_value)
        self.final_value = _number("final_value", final_value)
        start_warmup_value = _number("start_warmup_value", start_warmup_value)
        self.total_iters = _count("total_iters", total_iters)
        warmup_iters = _count("warmup_iters", warmup_iters)
        freeze_iters = _count("freeze_iters", freeze_iters)
        if freeze_iters + warmup_iters > self.total_iters:
            raise ValueError(
                f"freeze_iters ({freeze_iters}) + warmup_iters ({warmup_iters}) must not exceed "
                f"total_iters ({self.total_iters})"
            )
        n_cosine = self.total_iters - warmup_iters - freeze_iters
        phase = np.arange(n_cosine) / max(n_cosine, 1)
        cosine = self.final_value + 0.5 * (base_value - self.final_value) * (
            1 + np.cos(np.pi * phase)
        )
        self.schedule = np.concatenate(
            (
                np.zeros(freeze_iters),
                np.linspace(start_warmup_value, base_value, warmup_iters),
                cosine,
            )
        ).astype(np.float64)

    def __getitem__(self, it: int) -> float:
        if isinstance(it, bool) or not isinstance(it, numbers.Integral) or it < 0:
            raise ValueError(f"the iteration must be an int >= 0, got {it!r}")
        if it >= self.total_iters:
            return self.final_value
        return float(self.schedule[it])

    def __len__(self) -> int:
        return self.total_iters

    def __iter__(self) -> Iterator[float]:
        return iter(self.schedule.tolist())

    def __repr__(self) -> str:
        return f"CosineScheduler(total_iters={self.total_iters}, final_value={self.final_value})"


def scaled_lr(base_lr: float, total_batch: int) -> float:
    """DINOv2's ``sqrt_wrt_1024`` rule: ``base_lr · sqrt(total_batch / 1024)``, the total batch
    being images per process × processes."""
    base_lr = _number("base_lr", base_lr)
    if isinstance(total_batch, bool) or not isinstance(total_batch, numbers.Integral):
        raise TypeError(f"total_batch must be an int, got {type(total_batch).__name__}")
    if total_batch < 1:
        raise ValueError(f"total_batch must be >= 1, got {total_batch}")
    return base_lr * math.sqrt(total_batch / 1024)


@dataclass(frozen=True)
class ScheduleValues:
    """The schedules' values at one iteration."""

    lr: float
    wd: float
    momentum: float
    teacher_temp: float
    last_layer_lr: float


@dataclass(frozen=True)
class Schedules:
    """The five per-iteration schedules of DINOv2's training loop."""

    lr: CosineScheduler
    wd: CosineScheduler
    momentum: CosineScheduler
    teacher_temp: CosineScheduler
    last_layer_lr: CosineScheduler

    @property
    def total_iters(self) -> int:
        return self.lr.total_iters

    def at(self, it: int) -> ScheduleValues:
        """Every schedule's value at iteration ``it`` (``dataclasses.asdict`` makes a dict)."""
        return ScheduleValues(
            lr=self.lr[it],
            wd=self.wd[it],
            momentum=self.momentum[it],
            teacher_temp=self.teacher_temp[it],
            last_layer_lr=self.last_layer_lr[it],
        )


def _get(cfg: Mapping[str, Any], dotted: str) -> Any:
    section, key = dotted.split(".")
    try:
        return cfg[section][key]
    except (KeyError, TypeError):
        raise ValueError(f"the config needs {dotted}") from None


def _iterations(cfg: Mapping[str, Any], dotted: str, epoch_length: int) -> int:
    epochs = _get(cfg, dotted)
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Real) or epochs < 0:
        raise ValueError(f"{dotted} must be a number >= 0, got {epochs!r}")
    iterations = epochs * epoch_length
    if abs(iterations - round(iterations)) > 1e-6 * max(1.0, abs(iterations)):
        raise ValueError(
            f"{dotted} ({epochs}) × train.OFFICIAL_EPOCH_LENGTH ({epoch_length}) must be a whole "
            f"number of iterations"
        )
    return int(round(iterations))


def _resolve_lr(cfg: Mapping[str, Any], world_size: int | None) -> float:
    optim = cfg.get("optim")
    if not isinstance(optim, Mapping):
        raise ValueError("the config needs an optim section")
    lr = optim.get("lr")
    if lr:  # DINOv2's default config has lr 0: "set by the scaling rule"
        return _number("optim.lr", lr)
    base_lr = _number("optim.base_lr", _get(cfg, "optim.base_lr"))
    rule = optim.get("scaling_rule", "sqrt_wrt_1024")
    if rule in (None, "none"):
        return base_lr
    if rule != "sqrt_wrt_1024":
        raise ValueError(f"optim.scaling_rule must be sqrt_wrt_1024 or none, got {rule!r}")
    batch = _get(cfg, "train.batch_size_per_gpu")
    world = _world_size() if world_size is None else world_size
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world!r}")
    return scaled_lr(base_lr, batch * world)


def build_schedules(
    cfg: Mapping[str, Any], world_size: int | None = None, *, lr: float | None = None
) -> Schedules:
    """DINOv2's ``build_schedulers`` from a config with DINOv2's keys (a nested mapping).

    - lr: linear 0 → lr over ``optim.warmup_epochs``, cosine → ``optim.min_lr`` at
      ``optim.epochs``. lr is the ``lr`` argument when given, else ``optim.lr`` when the config
      has a non-zero one, else
      ``optim.base_lr`` scaled by ``optim.scaling_rule`` (``sqrt_wrt_1024``, the default, with the
      total batch ``train.batch_size_per_gpu × world_size``; ``none`` keeps base_lr).
      ``world_size`` defaults to torch.distributed's (1 when not initialised).
    - wd: cosine ``optim.weight_decay`` → ``optim.weight_decay_end``, no warmup.
    - momentum: cosine ``teacher.momentum_teacher`` → ``teacher.final_momentum_teacher``.
    - teacher_temp: linear ``teacher.warmup_teacher_temp`` → ``teacher.teacher_temp`` over
      ``teacher.warmup_teacher_temp_epochs``, then constant.
    - last_layer_lr: the lr schedule with its first ``optim.freeze_last_layer_epochs`` epochs zero.

    Raises:
        ValueError: a missing key (named), a negative or fractional iteration count, warmup
            longer than training, an unknown scaling rule.
    """
    epoch_length = _get(cfg, "train.OFFICIAL_EPOCH_LENGTH")
    if isinstance(epoch_length, bool) or not isinstance(epoch_length, int) or epoch_length < 1:
        raise ValueError(f"train.OFFICIAL_EPOCH_LENGTH must be an int >= 1, got {epoch_length!r}")
    total = _iterations(cfg, "optim.epochs", epoch_length)
    lr = _resolve_lr(cfg, world_size) if lr is None else _number("lr", lr)
    lr_args = dict(
        base_value=lr,
        final_value=_get(cfg, "optim.min_lr"),
        total_iters=total,
        warmup_iters=_iterations(cfg, "optim.warmup_epochs", epoch_length),
        start_warmup_value=0.0,
    )
    last_layer_lr = CosineScheduler(**lr_args)
    freeze = _iterations(cfg, "optim.freeze_last_layer_epochs", epoch_length)
    last_layer_lr.schedule[:freeze] = 0.0
    warmup_temp = _iterations(cfg, "teacher.warmup_teacher_temp_epochs", epoch_length)
    return Schedules(
        lr=CosineScheduler(**lr_args),
        wd=CosineScheduler(
            _get(cfg, "optim.weight_decay"), _get(cfg, "optim.weight_decay_end"), total
        ),
        momentum=CosineScheduler(
            _get(cfg, "teacher.momentum_teacher"),
            _get(cfg, "teacher.final_momentum_teacher"),
            total,
        ),
        teacher_temp=CosineScheduler(
            _get(cfg, "teacher.teacher_temp"),
            _get(cfg, "teacher.teacher_temp"),
            total_iters=warmup_temp,
            warmup_iters=warmup_temp,
            start_warmup_value=_get(cfg, "teacher.warmup_teacher_temp"),
        ),
        last_layer_lr=last_layer_lr,
    )
