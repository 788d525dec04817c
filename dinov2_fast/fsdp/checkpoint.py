"""Training checkpoints with torch.distributed.checkpoint (DCP): save, resume, export.

One checkpoint is one directory ``<directory>/step_{step:08d}/``:

- DCP's files (``.metadata``, ``__{rank}_0.distcp``): the models' state (each rank writes its own
  shards of FSDP2-sharded models; replicated tensors once), the optimizer's state and the
  scheduler's ``state_dict``;
- ``meta.json`` (rank 0): the step, the model names, what else is in it, the world size and the
  trainer's ``extra`` dict;
- ``rng/rank{r:05d}.pt`` (every rank): that rank's Python, NumPy, torch CPU and current-device
  CUDA generator states.

``<directory>/latest`` names the newest complete checkpoint. Saving is atomic: everything is
written into a temporary sibling (``.tmp-step_...``), and only when every rank has finished does
rank 0 rename it into place and then replace ``latest`` (written to a temporary file, then
``os.replace``). A save interrupted at any point, by an exception or a kill, leaves the previous
checkpoint and ``latest`` as they were; loading ignores temporary directories and the next save
deletes them.

Models are saved by name: ``model=`` is one module (stored as ``"model"``) or a mapping of names
to modules, e.g. ``{"student": student, "teacher": teacher}``; the keys in the checkpoint are
``<name>.<parameter FQN>``. The state dicts come from ``torch.distributed.checkpoint.state_dict``
(``get_state_dict``, with the optimizer state flattened per parameter FQN), which keeps FSDP2's
parameter names and removes FSDP1's, DDP's, activation checkpointing's and ``torch.compile``'s
wrapper names from the keys, and DCP reshards on load: a checkpoint saved on N ranks resumes on M ranks, sharded or not, and in a
single process without a process group. All ranks call :func:`save_checkpoint` and
:func:`load_checkpoint` (they are collective when torch.distributed is initialised); the
directory must be on a filesystem every rank sees.

:func:`export_state_dict` turns a live (sharded) model or a checkpoint directory into a plain
fp32 CPU state dict with DINOv2's torch.hub keys (flat ``blocks.{i}``), which loads with
``strict=True`` into ``DinoVisionTransformer(block_chunks=0)`` and into DINOv2's own model.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule

from dinov2_fast.models.vision_transformer import _BLOCK_KEY

__all__ = [
    "export_state_dict",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]

LATEST = "latest"
META = "meta.json"
RNG_DIR = "rng"
FORMAT = "dinov2_fast.fsdp.checkpoint/1"
DEFAULT_NAME = "model"
# Top-level keys of the DCP state besides the models' names.
_OPTIMIZER = "optimizer"
_SCHEDULER = "scheduler"
_RESERVED = (_OPTIMIZER, _SCHEDULER)
_TMP = ".tmp-"  # a save in progress (or interrupted): ignored by loading, removed by saving
_TRASH = ".trash-"  # a step directory being replaced by a new save of the same step
_STEP_DIR = re.compile(r"step_(\d+)")
# get_state_dict's options: the optimizer state keyed by parameter FQN (and flat, so that every
# entry is a key of its own in DCP's metadata; torchtitan saves it the same way).
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
# Wrapper names that may appear in module names (FSDP1, activation checkpointing, torch.compile):
# get_state_dict removes them from the keys; optimizer-state bookkeeping and export use the same.
_WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")

ModelArg = nn.Module | Mapping[str, nn.Module]


# -- process group ------------------------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _collectively(what: str, work, *, rank0_only: bool) -> None:
    """Run ``work()`` on rank 0 (or on every rank), then synchronise; when it raised on any rank,
    raise on every rank (the failing rank its own error), so that no rank waits forever for
    one that failed."""
    error = None
    if not rank0_only or _rank() == 0:
        try:
            work()
        except Exception as caught:
            error = caught
    if _distributed():
        reports: list[str | None] = [None] * _world_size()
        report = None if error is None else f"{type(error).__name__}: {error}"
        dist.all_gather_object(reports, report)
        failed = [(rank, text) for rank, text in enumerate(reports) if text is not None]
        if failed and error is None:
            rank, text = failed[0]
            raise RuntimeError(f"{what} failed on rank {rank}: {text}")
    if error is not None:
        raise error


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every single-process call that it assumes a single process; we mean it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# -- files ----------------------------------------------------------------------------------------


def _fsync_directory(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, write) -> None:
    """``write(file)`` into a temporary sibling of ``path``, fsync it, then ``os.replace`` it."""
    tmp = path.with_name(f"{_TMP}{path.name}")
    with open(tmp, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    _fsync_directory(path.parent)


def _write_json(path: Path, value: Any) -> None:
    text = json.dumps(value, indent=1, sort_keys=True) + "\n"
    _write_atomic(path, lambda file: file.write(text.encode()))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _step_of(path: Path) -> int | None:
    match = _STEP_DIR.fullmatch(path.name)
    return int(match.group(1)) if match else None


def _is_complete(path: Path) -> bool:
    """A step directory whose save finished: DCP's metadata and our meta.json are there."""
    return (path / ".metadata").is_file() and (path / META).is_file()


def _step_dirs(directory: Path) -> list[Path]:
    """The ``step_*`` directories in ``directory``, oldest step first (complete or not)."""
    found = [p for p in directory.iterdir() if p.is_dir() and _step_of(p) is not None]
    return sorted(found, key=lambda p: (_step_of(p), p.name))


def _pointer_target(directory: Path) -> Path | None:
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not name or "/" in name or name in (".", ".."):
        return None
    return directory / name


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``directory``: the step directory ``latest`` names, else
    (no pointer, or it names a directory that is gone or incomplete) the complete ``step_*``
    directory of the highest step; None when there is none (or no such ``directory``).
    Temporary directories of saves in progress or interrupted are never returned."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    target = _pointer_target(directory)
    if target is not None and _is_complete(target):
        return target
    complete = [p for p in _step_dirs(directory) if _is_complete(p)]
    if target is not None:
        warnings.warn(
            f"{directory / LATEST} names {target.name!r}, which is not a complete checkpoint; "
            f"using {complete[-1].name if complete else 'none'}",
            stacklevel=2,
        )
    return complete[-1] if complete else None


def _resolve(path: str | os.PathLike) -> Path:
    """A step directory, or the latest checkpoint of a checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: it does not exist")
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}: not a directory")
    if (path / META).exists() or (path / ".metadata").exists() or any(path.glob("*.distcp")):
        if not _is_complete(path):
            missing = [n for n in (".metadata", META) if not (path / n).is_file()]
            raise FileNotFoundError(
                f"{path} is not a complete checkpoint (missing {', '.join(missing)}); "
                f"was its save interrupted?"
            )
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(
            f"no checkpoint in {path}: no '{LATEST}' pointer and no complete step_* directory"
        )
    return found


def _read_meta(step_dir: Path) -> dict[str, Any]:
    meta = json.loads((step_dir / META).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{step_dir / META} is not a dinov2_fast checkpoint of format {FORMAT!r} "
            f"(format {meta.get('format')!r})"
        )
    return meta


# -- models and state dicts ---------------------------------------------------------------------


def _named_models(model: ModelArg) -> dict[str, nn.Module]:
    if isinstance(model, nn.Module):
        return {DEFAULT_NAME: model}
    if not isinstance(model, Mapping) or not model:
        raise TypeError(
            f"model must be an nn.Module or a non-empty mapping of names to modules, "
            f"got {type(model).__name__}"
        )
    for name, module in model.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"model names must be Python identifiers (no dots), got {name!r}")
        if name in _RESERVED:
            raise ValueError(f"model name {name!r} is reserved ({', '.join(_RESERVED)})")
        if not isinstance(module, nn.Module):
            raise TypeError(f"model[{name!r}] must be an nn.Module, got {type(module).__name__}")
    return dict(model)


class _Models(nn.Module):
    """The named models as children of one module, so that get_state_dict / set_state_dict see
    one model whose FQNs are ``<name>.<fqn>`` (the models themselves are not changed)."""

    def __init__(self, models: dict[str, nn.Module]) -> None:
        super().__init__()
        for name, module in models.items():
            self._modules[name] = module  # names like "eval" would clash with attributes


def _check_optimizer(optimizer, models: dict[str, nn.Module]) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    owned = {id(p) for module in models.values() for p in module.parameters()}
    foreign = sum(
        1 for group in optimizer.param_groups for p in group["params"] if id(p) not in owned
    )
    if foreign:
        raise ValueError(
            f"the optimizer holds {foreign} parameter(s) that are in none of the models "
            f"({', '.join(models)}); pass every model it trains in model="
        )


def _reshard(module: nn.Module) -> None:
    """Reshard every FSDP2 unit of ``module`` (local; no communication). A unit that does not
    reshard after forward stays unsharded after a forward without backward (a teacher's): its
    registered parameters are then the gathered ones, in ``param_dtype``, not the fp32 shards.
    Recent torch reshards in FSDP2's state_dict hook; this does not depend on that."""
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


def _states(
    models: dict[str, nn.Module], optimizer, *, saving: bool
) -> tuple[nn.Module, dict, dict | None]:
    """(container, model state dict, flat optimizer state dict or None); collective.

    get_state_dict gives an optimizer that has no state yet one by stepping it once with zero
    gradients and lr 0 (AdamW's step counts become 1). When ``saving``, that is undone: the
    optimizer is left without state and the checkpoint holds none for it (its param groups
    only), so that saving changes nothing. When loading, the state is the template DCP fills."""
    for module in models.values():
        _reshard(module)
    container = _Models(models)
    if optimizer is None:
        return container, get_model_state_dict(container, options=_OPTIONS), None
    fresh = not optimizer.state
    model_state, optimizer_state = get_state_dict(container, optimizer, options=_OPTIONS)
    if saving and fresh:
        optimizer.state.clear()
        optimizer_state = {k: v for k, v in optimizer_state.items() if not k.startswith("state.")}
    return container, model_state, optimizer_state


def _check_scheduler(scheduler) -> None:
    if not (hasattr(scheduler, "state_dict") and hasattr(scheduler, "load_state_dict")):
        raise TypeError(
            f"scheduler must have state_dict() and load_state_dict(), got {type(scheduler).__name__}"
        )


# -- RNG states -----------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_file(step_dir: Path, rank: int) -> Path:
    return step_dir / RNG_DIR / f"rank{rank:05d}.pt"


# -- save -----------------------------------------------------------------------------------------


def _commit(directory: Path, tmp: Path, final: Path) -> None:
    """Rank 0: move the finished ``tmp`` to ``final`` and point ``latest`` at it.

    A step directory of the same name (from a run that resumed from an older checkpoint) is moved
    aside first and deleted last."""
    trash = None
    if final.exists():
        trash = directory / f"{_TRASH}{final.name}"
        _remove(trash)
        os.replace(final, trash)
    os.replace(tmp, final)
    _fsync_directory(directory)
    _write_pointer(directory, final.name)
    if trash is not None:
        _remove(trash)


def _write_pointer(directory: Path, name: str) -> None:
    _write_atomic(directory / LATEST, lambda file: file.write(f"{name}\n".encode()))


def _prune(directory: Path, keep: int | None) -> None:
    """Rank 0: delete the step directories beyond the newest ``keep`` (never ``latest``'s)."""
    if keep is None:
        return
    target = _pointer_target(directory)
    for old in _step_dirs(directory)[:-keep]:
        if target is None or old.name != target.name:
            # Renamed first, so that a kill mid-deletion leaves no half-deleted step directory.
            trash = directory / f"{_TRASH}{old.name}"
            os.replace(old, trash)
            _remove(trash)


def _remove_stale(directory: Path) -> None:
    """Rank 0: delete what interrupted saves left (temporary and trash directories and files)."""
    for entry in directory.iterdir():
        if entry.name.startswith((_TMP, _TRASH)):
            _remove(entry)


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    *,
    model: ModelArg,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    extra: Mapping[str, Any] | None = None,
    keep: int | None = 3,
    rng: bool = True,
) -> Path:
    """Save a training checkpoint to ``directory/step_{step:08d}/``, atomically; returns its path.

    Collective: every rank calls it with the same arguments when torch.distributed is initialised;
    without a process group it saves from this single process.

    Args:
        directory: the checkpoint directory (created if missing; on storage every rank sees).
        step: the training step (an int >= 0); :func:`load_checkpoint` returns it.
        model: an ``nn.Module`` (saved under the name ``"model"``) or a mapping of names to modules
            (``{"student": s, "teacher": t}``), FSDP2-sharded or plain. Each rank writes its own
            shards; keys are ``<name>.<parameter FQN>``.
        optimizer: its state, keyed by parameter FQN (``get_state_dict``), so it reshards on load;
            every parameter it holds must be in one of the models.
        scheduler: anything with ``state_dict()`` / ``load_state_dict()`` (an LR scheduler).
        extra: a small JSON-serialisable dict for the trainer (data-loader position, config...),
            written by rank 0 and returned by :func:`load_checkpoint`.
        keep: after the save, delete the step directories beyond the newest ``keep`` (by step; the
            one ``latest`` names is never deleted); None keeps all.
        rng: also save every rank's RNG states (Python, NumPy, torch CPU, current CUDA device),
            which :func:`load_checkpoint` restores when the world size is the same.

    The save writes into ``directory/.tmp-step_{step:08d}``; when all ranks are done, rank 0
    renames it to ``step_{step:08d}`` (replacing an older save of the same step) and then points
    ``directory/latest`` at it. An interrupted save leaves the previous checkpoint and ``latest``
    intact; the next save removes what it left.

    Raises:
        TypeError / ValueError: a bad argument (named), ``extra`` that JSON cannot encode, model
            names that are not identifiers or are reserved ("optimizer", "scheduler"), an
            optimizer holding parameters of no model.
        torch.distributed.checkpoint.api.CheckpointException: a rank failed to write.
    """
    directory = Path(directory)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep must be an int >= 1 or None, got {keep!r}")
    extra = {} if extra is None else extra
    if not isinstance(extra, Mapping):
        raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
    try:
        extra_json = json.loads(json.dumps(dict(extra)))
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"extra must be JSON-serialisable (save tensors in a model): {error}"
        ) from None
    models = _named_models(model)
    if optimizer is not None:
        _check_optimizer(optimizer, models)
    if scheduler is not None:
        _check_scheduler(scheduler)

    rank, world = _rank(), _world_size()
    name = f"step_{step:08d}"
    final, tmp = directory / name, directory / f"{_TMP}{name}"

    def prepare() -> None:
        directory.mkdir(parents=True, exist_ok=True)
        _remove_stale(directory)
        tmp.mkdir()

    _collectively("preparing the checkpoint directory", prepare, rank0_only=True)

    _, model_state, optimizer_state = _states(models, optimizer, saving=True)
    state: dict[str, Any] = dict(model_state)
    if optimizer_state is not None:
        state[_OPTIMIZER] = optimizer_state
    if scheduler is not None:
        state[_SCHEDULER] = scheduler.state_dict()
    with _quiet_single_process():  # raises on every rank when one fails
        dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp), no_dist=not _distributed())

    def write_rank_files() -> None:
        if rng:
            _rng_file(tmp, rank).parent.mkdir(exist_ok=True)
            _write_atomic(_rng_file(tmp, rank), lambda file: torch.save(_rng_state(), file))
        if rank == 0:
            meta = {
                "format": FORMAT,
                "step": step,
                "models": list(models),
                "optimizer": optimizer is not None,
                "scheduler": scheduler is not None,
                "rng": rng,
                "world_size": world,
                "extra": extra_json,
                "torch": torch.__version__,
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            _write_json(tmp / META, meta)

    _collectively("writing the RNG states and meta.json", write_rank_files, rank0_only=False)

    def commit() -> None:
        _commit(directory, tmp, final)
        _prune(directory, keep)

    # Nobody returns before the checkpoint is in place.
    _collectively("committing the checkpoint", commit, rank0_only=True)
    return final


# -- load -----------------------------------------------------------------------------------------


def _listing(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def _global_shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _check_keys(step_dir: Path, stored: dict[str, Any], state: dict[str, Any], what: str, prefixes):
    """Raise ValueError naming the keys of ``state`` (DCP keys, ``prefixes``) that the checkpoint
    lacks, those it has that ``state`` lacks, and those whose shapes differ."""
    expected = set(state)
    present = {k for k in stored if k.startswith(prefixes)}
    missing, unexpected = expected - present, present - expected
    mismatched = []
    for key in sorted(expected & present):
        shape = _global_shape(state[key])
        item = stored[key]
        if shape is not None and isinstance(item, TensorStorageMetadata):
            if tuple(item.size) != shape:
                mismatched.append(f"{key}: checkpoint {list(item.size)}, here {list(shape)}")
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{what} does not match checkpoint {step_dir}:"]
    if missing:
        lines.append(f"  missing in the checkpoint: {_listing(missing)}")
    if unexpected:
        lines.append(f"  in the checkpoint but not here: {_listing(unexpected)}")
    if mismatched:
        lines.append(f"  shapes differ: {'; '.join(mismatched[:8])}")
    if missing and {_hub_key_of(k) for k in missing} == {_hub_key_of(k) for k in unexpected}:
        lines.append(
            "  (the same blocks in another layout: block_chunks differs; export_state_dict() "
            "gives flat keys that models.load_weights() maps to any layout)"
        )
    raise ValueError("\n".join(lines))


def _unstepped(optimizer_state: Mapping[str, Any], stored: Mapping[str, Any]) -> set[str]:
    """The parameters (FQNs) that the checkpoint's optimizer held but had no state for: never
    stepped (e.g. an unused ``mask_token``), or all of them when saved before the first step.
    The template (get_state_dict's) has state for them: a zero-gradient step made it."""
    groups = f"{_OPTIMIZER}.param_groups."
    states = f"{_OPTIMIZER}.state."
    held = {k[len(groups) :].rsplit(".", 1)[0] for k in stored if k.startswith(groups)}
    with_state = {k[len(states) :].rsplit(".", 1)[0] for k in stored if k.startswith(states)}
    found = set()
    for key in optimizer_state:
        if key.startswith("state."):
            fqn = key[len("state.") :].rsplit(".", 1)[0]
            if fqn in held and fqn not in with_state:
                found.add(fqn)
    return found


def _forget_state(container: nn.Module, optimizer, fqns: set[str]) -> None:
    """Remove ``optimizer``'s state of these parameters, as it was at the save."""
    for name, param in container.named_parameters():
        if _clean_key(name) in fqns:
            optimizer.state.pop(param, None)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: ModelArg,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    rng: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint of :func:`save_checkpoint` into ``model`` (and ``optimizer``,
    ``scheduler``), in place; returns ``{"step": int, "extra": dict, "path": Path}``.

    Collective when torch.distributed is initialised (every rank calls it); also works in a
    single process without a process group. DCP reshards: the checkpoint may come from any number
    of ranks, and the models may be FSDP2-sharded (any world size) or plain.

    Args:
        path: a checkpoint directory (loads the checkpoint ``latest`` names, or else the newest
            complete one) or one ``step_*`` directory.
        model: as for :func:`save_checkpoint`: a module (the checkpoint's ``"model"``) or a mapping
            of names to modules; a subset of the saved models may be loaded (e.g. only
            ``{"teacher": t}``). Keys must match exactly (strict).
        optimizer: restore its state (the checkpoint must have one for exactly its parameters);
            its param groups' hyperparameters (lr, ...) are restored too.
        scheduler: restore its ``state_dict`` (after the optimizer's).
        rng: restore this rank's RNG states when they were saved by the same world size (a
            warning says when they cannot be).

    Raises:
        FileNotFoundError: no checkpoint at ``path``, or an incomplete step directory.
        ValueError: a model name the checkpoint lacks (the error lists those it has); model or
            optimizer keys that do not match (missing, unexpected, shapes; each listed); an
            optimizer or scheduler asked for when the checkpoint has none.
    """
    step_dir = _resolve(path)
    meta = _read_meta(step_dir)
    models = _named_models(model)
    if optimizer is not None:
        _check_optimizer(optimizer, models)
    if scheduler is not None:
        _check_scheduler(scheduler)
    absent = [name for name in models if name not in meta["models"]]
    if absent:
        raise ValueError(
            f"checkpoint {step_dir} has no model {', '.join(map(repr, absent))}; it holds "
            f"{', '.join(map(repr, meta['models']))} (pass model={{name: module}})"
        )
    if optimizer is not None and not meta["optimizer"]:
        raise ValueError(
            f"checkpoint {step_dir} holds no optimizer state (saved without optimizer=); "
            f"load it without optimizer= to start a fresh optimizer"
        )
    if scheduler is not None and not meta["scheduler"]:
        raise ValueError(
            f"checkpoint {step_dir} holds no scheduler state (saved without scheduler=); "
            f"load it without scheduler="
        )

    container, model_state, optimizer_state = _states(models, optimizer, saving=False)
    reader = dcp.FileSystemReader(step_dir)
    stored = reader.read_metadata().state_dict_metadata
    names = ", ".join(models)
    _check_keys(step_dir, stored, model_state, f"model ({names})", tuple(f"{n}." for n in models))
    state: dict[str, Any] = dict(model_state)
    unstepped: set[str] = set()
    if optimizer_state is not None:
        unstepped = _unstepped(optimizer_state, stored)
        state[_OPTIMIZER] = {
            k: v
            for k, v in optimizer_state.items()
            if not (k.startswith("state.") and k[len("state.") :].rsplit(".", 1)[0] in unstepped)
        }
        flat = {f"{_OPTIMIZER}.{k}": v for k, v in state[_OPTIMIZER].items()}
        _check_keys(step_dir, stored, flat, "optimizer state", (f"{_OPTIMIZER}.",))
    if scheduler is not None:
        state[_SCHEDULER] = scheduler.state_dict()
    with _quiet_single_process():
        dcp.load(state, storage_reader=reader, no_dist=not _distributed())
    # DCP loads tensors in place and replaces the other values in ``state``.
    model_state.update((key, state[key]) for key in model_state)
    if optimizer_state is not None:
        optimizer_state.update(state[_OPTIMIZER])
    set_state_dict(
        container,
        optimizer if optimizer is not None else [],
        model_state_dict=model_state,
        optim_state_dict=optimizer_state if optimizer_state is not None else {},
        options=_OPTIONS,
    )
    if unstepped:
        _forget_state(container, optimizer, unstepped)
    if scheduler is not None:
        scheduler.load_state_dict(state[_SCHEDULER])
    if rng and meta.get("rng"):
        rng_file = _rng_file(step_dir, _rank())
        if meta["world_size"] == _world_size() and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=True))
        else:
            warnings.warn(
                f"RNG states not restored: checkpoint {step_dir} was saved by "
                f"{meta['world_size']} rank(s), this run has {_world_size()}",
                stacklevel=2,
            )
    return {"step": int(meta["step"]), "extra": meta["extra"], "path": step_dir}


# -- export ---------------------------------------------------------------------------------------


def _hub_key(key: str) -> str:
    """``blocks.{chunk}.{i}.rest`` -> ``blocks.{i}.rest``; other keys unchanged."""
    match = _BLOCK_KEY.fullmatch(key)
    if match is None or match.group(2) is None:
        return key
    return f"blocks.{match.group(2)}.{match.group(3)}"


def _hub_key_of(key: str) -> str:
    """:func:`_hub_key` of a key behind its model name (``<name>.blocks.{c}.{i}...``)."""
    name, _, rest = key.partition(".")
    return f"{name}.{_hub_key(rest)}"


def _clean_key(key: str) -> str:
    return ".".join(part for part in key.split(".") if part not in _WRAPPER_PARTS)


def _offline_state(step_dir: Path, key: str | None) -> dict[str, Any]:
    """One model's tensors from a checkpoint, read in this process alone (no process group)."""
    meta = _read_meta(step_dir)
    if key is None:
        if len(meta["models"]) == 1:
            key = meta["models"][0]
        elif DEFAULT_NAME in meta["models"]:
            key = DEFAULT_NAME
        else:
            raise ValueError(
                f"checkpoint {step_dir} holds several models "
                f"({', '.join(map(repr, meta['models']))}); choose one with key="
            )
    reader = dcp.FileSystemReader(step_dir)
    prefix = f"{key}."
    template: dict[str, Any] = {}
    for fqn, item in reader.read_metadata().state_dict_metadata.items():
        if fqn.startswith(prefix):
            if isinstance(item, TensorStorageMetadata):
                template[fqn] = torch.empty(tuple(item.size), dtype=item.properties.dtype)
            else:
                template[fqn] = None  # DCP fills in non-tensor entries
    if not template:
        raise ValueError(
            f"checkpoint {step_dir} has no model {key!r}; it holds "
            f"{', '.join(map(repr, meta['models']))} (a name or a submodule, e.g. 'teacher.backbone')"
        )
    with _quiet_single_process():
        dcp.load(template, storage_reader=reader, no_dist=True)
    return {fqn[len(prefix) :]: value for fqn, value in template.items()}


def export_state_dict(
    source: nn.Module | str | os.PathLike,
    path: str | os.PathLike | None = None,
    *,
    key: str | None = None,
    hub_keys: bool = True,
    dtype: torch.dtype | None = torch.float32,
) -> dict[str, torch.Tensor]:
    """A plain, full state dict of one model, on the CPU: DINOv2's torch.hub layout.

    Args:
        source: a live model, FSDP2-sharded or plain (collective when torch.distributed is
            initialised: every rank calls it and rank 0 gets the state dict, the other ranks an
            empty dict); or a checkpoint directory / step directory of :func:`save_checkpoint`,
            read by the calling process alone (no process group needed; every caller gets it).
        path: if given, rank 0 also writes the state dict there with ``torch.save`` (atomically).
        key: which part to export. For a directory: a model name of the checkpoint (default: its
            only model, else ``"model"``) or a submodule of one, e.g. ``"teacher.backbone"``. For
            a live model: a submodule prefix (default: the whole model).
        hub_keys: rename chunked block keys ``blocks.{chunk}.{i}.*`` (DINOv2's training layout,
            ``block_chunks > 0``) to ``blocks.{i}.*`` (the hub layout, ``block_chunks=0``).
        dtype: cast floating-point tensors to it (default float32); None keeps each tensor's.

    Wrapper names (FSDP1's, activation checkpointing's, torch.compile's) do not appear in the keys;
    patched modules (:func:`dinov2_fast.patch`) have the same keys as unpatched ones. The result
    loads with ``strict=True`` into ``models.DinoVisionTransformer(..., block_chunks=0)`` and into
    DINOv2's own model of the same configuration; ``models.load_weights`` maps it to any
    ``block_chunks``.

    Raises:
        FileNotFoundError: no checkpoint at ``source``.
        ValueError: ``key`` names nothing in the source (the error lists what there is), or a
            checkpoint with several models and no ``key``.
    """
    if isinstance(source, nn.Module):
        prefix = "" if key is None else f"{key}."
        if key is not None:  # checked on every rank, before the collective
            names = [_clean_key(k) for k in source.state_dict()]
            if not any(k.startswith(prefix) for k in names):
                raise ValueError(
                    f"the model has no submodule {key!r} with state; its top-level modules: "
                    f"{_listing({k.split('.', 1)[0] for k in names})}"
                )
        _reshard(source)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        gathered = get_model_state_dict(source, options=options)  # empty on ranks other than 0
        state = {
            _clean_key(k)[len(prefix) :]: v
            for k, v in gathered.items()
            if _clean_key(k).startswith(prefix)
        }
    elif isinstance(source, (str, os.PathLike)):
        state = _offline_state(_resolve(source), key)
    else:
        raise TypeError(
            f"source must be an nn.Module or a checkpoint directory, got {type(source).__name__}"
        )
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            detached = value.detach()
            cast = dtype if dtype is not None and detached.is_floating_point() else detached.dtype
            value = detached.to(device="cpu", dtype=cast)
            if value.untyped_storage().data_ptr() == detached.untyped_storage().data_ptr():
                value = value.clone()  # never alias the live model's parameters
        out[_hub_key(name) if hub_keys else name] = value
    if path is not None and _rank() == 0 and out:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(target, lambda file: torch.save(out, file))
    return out
