"""``patch(model)``: our kernels in a DINOv2 or timm Vision Transformer that already exists.

Three kinds of module are found by their structure and attribute names (so that copies of
DINOv2's and timm's classes in other code bases are found too), not by class identity:

- **layer_norm**: an ``nn.LayerNorm`` (or a subclass named ``LayerNorm``, as timm's, or one that
  keeps torch's forward) runs :func:`dinov2_fast.ops.layer_norm`;
- **attention**: a module with ``qkv`` (Linear to 3·width), ``proj``, ``num_heads`` and nothing
  else that computes (no own parameters; timm's ``q_norm``, ``k_norm`` and ``norm`` Identity, no
  ``gate``) runs our fused attention, and takes a packed crop list with a ``BlockDiagonalMask``;
- **block**: a pre-norm block (a class named ``Block`` or ``NestedTensorBlock`` in its MRO, with
  ``norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2``) runs :class:`dinov2_fast.nn.Block`'s
  residual logic: stochastic depth on the kept samples only (DINOv2's subset form above a drop
  rate of 0.1, the module's own per-sample mask below), LayerScale folded into one fused update,
  and the packed multi-crop path for lists.

Patching is in place and keeps each module object: only its class changes, to a subclass of its
own class (same name) whose forward is ours. Parameters, buffers, hooks, ``isinstance`` checks and
the state_dict are unchanged; optimizers holding the parameters keep working. Calls the kernels do
not cover (an ``attn_mask`` or ``is_causal``, attention dropout in training) run the module's
original forward. :func:`unpatch` restores the classes; patching twice is a no-op.

Pickling a patched model whole (``torch.save(model)``) stores the original classes: it loads
unpatched (the same weights), so call :func:`patch` again after loading. State dicts are the same
patched or not.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from dinov2_fast import _backend
from dinov2_fast.nn.attention import Attention, qkv_self_attention
from dinov2_fast.nn.block import Block
from dinov2_fast.nn.layer_norm import LayerNorm
from dinov2_fast.ops.attention import HEAD_DIMS

__all__ = [
    "PatchEntry",
    "PatchReport",
    "is_vit_block",
    "patch",
    "subclass_keeping_name",
    "unpatch",
    "vit_blocks",
]

KINDS = ("layer_norm", "attention", "block")

# A patched class's attribute naming the class it replaces; a patched module's attribute listing
# the instance attributes patch() added (removed again by unpatch()).
_ORIGINAL = "_dinov2_fast_original"
_ADDED = "_dinov2_fast_added"

_BLOCK_CLASS_NAMES = ("Block", "NestedTensorBlock")  # DINOv2's and timm's pre-norm blocks
_BLOCK_CHILDREN = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
_BLOCK_ARGUMENTS = {"x", "x_or_x_list", "attn_mask", "is_causal"}
# What an attention module may hold besides qkv and proj: dropouts, and timm's optional norms and
# gate when they are Identity / None.
_ATTENTION_EXTRAS = {"attn_drop", "proj_drop", "q_norm", "k_norm", "norm", "gate"}
_ATTENTION_ARGUMENTS = {"x", "attn_bias", "attn_mask", "is_causal"}


@dataclass(frozen=True)
class PatchEntry:
    """One module: its name in the model ("" for the model itself), kind, original class and,
    for modules left as they were, the reason."""

    name: str
    kind: str
    module_class: str
    reason: str = ""


@dataclass
class PatchReport:
    """What :func:`patch` replaced (or :func:`unpatch` restored), what it left and why, and what
    was already ours or patched before."""

    action: str = "patched"
    replaced: list[PatchEntry] = field(default_factory=list)
    left: list[PatchEntry] = field(default_factory=list)
    unchanged: list[PatchEntry] = field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        """``{"replaced": {kind: n}, "left": {...}, "unchanged": {...}}``."""
        return {
            group: {kind: sum(e.kind == kind for e in entries) for kind in KINDS}
            for group, entries in (
                ("replaced", self.replaced),
                ("left", self.left),
                ("unchanged", self.unchanged),
            )
        }

    def __str__(self) -> str:
        def summary(entries: list[PatchEntry]) -> str:
            counts = {kind: sum(e.kind == kind for e in entries) for kind in KINDS}
            return ", ".join(f"{n} {kind}" for kind, n in counts.items()) or "nothing"

        lines = [
            f"dinov2_fast.{'patch' if self.action == 'patched' else 'unpatch'}: "
            f"{self.action} {summary(self.replaced)}; left {len(self.left)}; "
            f"unchanged {len(self.unchanged)}"
        ]
        for entry in self.left:
            name = entry.name or "(model)"
            lines.append(f"  left {entry.kind} {name} ({entry.module_class}): {entry.reason}")
        return "\n".join(lines)


# --- the patched classes: our forward first in the MRO, then the module's own class ---------------


class _PatchedLayerNorm(LayerNorm):
    """Our LayerNorm's forward over the module's own parameters (and its class's forward for
    dtypes the kernels do not take)."""


class _PatchedAttention(nn.Module):
    """Our fused attention over the module's own ``qkv`` and ``proj``."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        original = getattr(type(self), _ORIGINAL)
        attn_bias = kwargs.pop("attn_bias", None)
        if _any_set(args, kwargs):  # bind by name: DINOv2's MemEffAttention takes attn_bias 2nd
            arguments = _arguments(original.forward, self, x, args, kwargs)
            attn_bias = arguments.pop("attn_bias", attn_bias)
            if any(value is not None and value is not False for value in arguments.values()):
                return self._original_forward(original, attn_bias, x, args, kwargs, "a mask")
        if self.training and _attention_dropout(self) > 0:
            return self._original_forward(original, attn_bias, x, args, kwargs, "dropout")
        return qkv_self_attention(self, x, attn_bias, self.backend)

    def _original_forward(self, original, attn_bias, x, args, kwargs, what: str) -> torch.Tensor:
        if attn_bias is not None:
            raise ValueError(
                f"attention with {what} cannot run on packed crops (attn_bias): the fused "
                "kernels take neither, and the module's own forward no BlockDiagonalMask"
            )
        return original.forward(self, x, *args, **kwargs)


class _PatchedBlock(Block):
    """Our block's residual logic over the module's own children; calls with a mask run the
    block's own forward."""

    def forward(self, x, *args, **kwargs):
        if _any_set(args, kwargs):
            return getattr(type(self), _ORIGINAL).forward(self, x, *args, **kwargs)
        return Block.forward(self, x)

    def forward_nested(self, x_list: list[torch.Tensor]) -> list[torch.Tensor]:
        if not _takes_packed_crops(self.attn):
            raise TypeError(
                f"a list of crop groups needs the block's attention patched too (it is "
                f"{type(self.attn).__name__}): call dinov2_fast.patch(model, attention=True)"
            )
        return Block.forward_nested(self, x_list)


_MIXINS: dict[str, type[nn.Module]] = {
    "layer_norm": _PatchedLayerNorm,
    "attention": _PatchedAttention,
    "block": _PatchedBlock,
}
_subclasses: dict[tuple[type, type], type] = {}


def subclass_keeping_name(original: type, mixin: type, marker: str = _ORIGINAL) -> type:
    """``class <original name>(mixin, original)`` with ``marker`` naming ``original``, made once
    per pair. It keeps the original's name, module and qualname, so reprs read the same and
    pickles store the original class. Patching uses it, and so does FSDP's activation
    checkpointing (a swap of a module's class that leaves its state_dict alone)."""
    key = (original, mixin)
    if key not in _subclasses:
        _subclasses[key] = type(
            original.__name__,
            (mixin, original),
            {
                marker: original,
                "__module__": original.__module__,
                "__qualname__": original.__qualname__,
            },
        )
    return _subclasses[key]


# --- recognising modules --------------------------------------------------------------------------


def _any_set(args: tuple, kwargs: dict) -> bool:
    """Whether a call passes anything but the defaults (None, False) after x."""
    return any(value is not None and value is not False for value in (*args, *kwargs.values()))


def _arguments(function, module, x, args, kwargs) -> dict:
    """The call's arguments after ``x`` by name, bound to ``function``'s signature."""
    bound = _signature(function).bind(module, x, *args, **kwargs)
    return dict(list(bound.arguments.items())[2:])


_signatures: dict[object, inspect.Signature] = {}


def _signature(function) -> inspect.Signature:
    if function not in _signatures:
        _signatures[function] = inspect.signature(function)
    return _signatures[function]


def _forward_arguments(module: nn.Module) -> set[str] | None:
    """Names of the forward's parameters after self, or None when it takes *args or **kwargs."""
    parameters = list(_signature(type(module).forward).parameters.values())[1:]
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
        return None
    return {p.name for p in parameters}


def _attention_dropout(module: nn.Module) -> float:
    """DINOv2 (since 2025) keeps ``attn_drop`` as a float, older DINOv2 and timm as a Dropout."""
    drop = getattr(module, "attn_drop", None)
    if drop is None:
        return 0.0
    if isinstance(drop, (int, float)):
        return float(drop)
    return float(getattr(drop, "p", 0.0))


def _is_identity(module: object) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _ours(module: nn.Module, kind: str) -> bool:
    """Already one of dinov2_fast's modules of this kind (built from dinov2_fast.nn)."""
    own = {"layer_norm": LayerNorm, "attention": Attention, "block": Block}[kind]
    return isinstance(module, own) and not isinstance(module, _MIXINS[kind])


def _takes_packed_crops(attn: nn.Module) -> bool:
    return isinstance(attn, (Attention, _PatchedAttention))


def _layer_norm_problem(module: nn.Module) -> str | None:
    """None when ``module`` is a LayerNorm over its last dimensions; else why it is left."""
    cls = type(module)
    if cls.forward is not nn.LayerNorm.forward and cls.__name__ != "LayerNorm":
        return (
            f"{cls.__name__} overrides nn.LayerNorm's forward (not known to be a plain LayerNorm)"
        )
    return None


def _attention_problem(module: nn.Module) -> str | None:
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    heads = getattr(module, "num_heads", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear):
        return "qkv and proj are not both nn.Linear"
    if isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0:
        return "num_heads is not a positive int"
    width, rest = divmod(qkv.out_features, 3)
    if rest or width % heads or proj.in_features != width:
        return f"qkv ({qkv.out_features}) is not 3 x proj's input ({proj.in_features}) in heads"
    own = [name for name, _ in module.named_parameters(recurse=False)]
    own += [name for name, _ in module.named_buffers(recurse=False)]
    if own:
        return f"it holds parameters or buffers of its own ({', '.join(own)}): a bias or rope"
    for name in ("q_norm", "k_norm", "norm", "gate"):
        if not _is_identity(getattr(module, name, None)):
            what = {"q_norm": "qk_norm", "k_norm": "qk_norm", "norm": "scale_norm", "gate": "gated"}
            return f"{what[name]} ({name} is {type(getattr(module, name)).__name__})"
    extra = {name for name, _ in module.named_children()} - {"qkv", "proj"} - _ATTENTION_EXTRAS
    if extra:
        return f"it has children the kernels do not compute: {', '.join(sorted(extra))}"
    arguments = _forward_arguments(module)
    if arguments is None or not arguments <= _ATTENTION_ARGUMENTS:
        return f"forward takes arguments the kernels do not: {arguments or '*args/**kwargs'}"
    head_dim = width // heads
    if head_dim not in HEAD_DIMS:
        return f"head dim {head_dim} is not one the kernels take ({', '.join(map(str, HEAD_DIMS))})"
    return None


def _drop_rate(module: nn.Module) -> tuple[float | None, str | None]:
    """A drop-path module's rate (Identity: 0), or a reason it cannot be read."""
    if _is_identity(module):
        return 0.0, None
    rate = getattr(module, "drop_prob", None)
    if rate is None and hasattr(module, "drop_prob"):
        return 0.0, None
    if not isinstance(rate, (int, float)):
        return None, f"{type(module).__name__} has no drop_prob"
    if rate > 0 and getattr(module, "scale_by_keep", True) is False:
        return None, "its drop path does not rescale the kept samples (scale_by_keep=False)"
    return float(rate), None


def _block_problem(module: nn.Module) -> tuple[str | None, float]:
    """(None, drop rate) when ``module`` is a pre-norm ViT block our residual logic computes."""
    names = [cls.__name__ for cls in type(module).__mro__]
    if not any(name in _BLOCK_CLASS_NAMES for name in names):
        return f"{type(module).__name__} is not a Block or NestedTensorBlock (order unknown)", 0.0
    missing = [name for name in _BLOCK_CHILDREN if not hasattr(module, name)]
    if missing:
        return f"it lacks {', '.join(missing)}", 0.0
    arguments = _forward_arguments(module)
    if arguments is None or not arguments <= _BLOCK_ARGUMENTS:
        return f"forward takes arguments our block does not: {arguments or '*args/**kwargs'}", 0.0
    rate1, why1 = _drop_rate(module.drop_path1)
    rate2, why2 = _drop_rate(module.drop_path2)
    if why1 or why2:
        return why1 or why2, 0.0
    ratio = getattr(module, "sample_drop_ratio", None)
    if ratio is None:
        if rate1 != rate2:
            return f"drop_path1 and drop_path2 have different rates ({rate1}, {rate2})", 0.0
        ratio = rate1
    return None, float(ratio)


# --- patch and unpatch -----------------------------------------------------------------------------


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _swap(module: nn.Module, kind: str, attributes: dict[str, object]) -> str | None:
    """Give ``module`` the patched class of its own and set ``attributes``; None when done, else
    why not (an attribute of that name already there and different)."""
    for name, value in attributes.items():
        if name in module.__dict__ and module.__dict__[name] != value:
            return f"it already has an attribute {name!r} of its own"
    added = [name for name in attributes if name not in module.__dict__]
    module.__class__ = subclass_keeping_name(type(module), _MIXINS[kind])
    for name, value in attributes.items():
        setattr(module, name, value)
    setattr(module, _ADDED, tuple(added))
    return None


def patch(
    model: nn.Module,
    *,
    attention: bool = True,
    layer_norm: bool = True,
    stochastic_depth: bool = True,
    backend: str = "auto",
) -> PatchReport:
    """Swap dinov2-fast's kernels into ``model`` (a DINOv2 backbone of DINOv2's own classes, a
    timm ``VisionTransformer``, or any model holding such blocks), in place.

    Args:
        model: the module to patch; every submodule is considered, the model itself included.
        attention: fused attention in attention modules (and packed crop lists through it).
        layer_norm: the fused LayerNorm in every LayerNorm.
        stochastic_depth: our residual logic in the blocks (subset stochastic depth, fused
            update, the packed list path).
        backend: the kernels' backend for the patched modules ("auto", "triton", "cuda", "torch").

    Returns:
        A :class:`PatchReport`: ``replaced`` (patched now), ``left`` (not patched, with the reason,
        e.g. timm's qk_norm), ``unchanged`` (ours already, or patched before). ``print(report)``
        gives a summary.

    Raises:
        TypeError: model is not an nn.Module, or a flag is not a bool.
        ValueError: an unknown backend.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, value in (
        ("attention", attention),
        ("layer_norm", layer_norm),
        ("stochastic_depth", stochastic_depth),
    ):
        _check_flag(name, value)
    backend = _backend.check_name(backend)
    wanted = {"layer_norm": layer_norm, "attention": attention, "block": stochastic_depth}
    report = PatchReport("patched")
    for name, module in list(model.named_modules()):
        kind = _kind(module)
        if kind is None or not wanted[kind]:
            continue
        entry = PatchEntry(name, kind, _class_name(type(module)))
        if _ORIGINAL in type(module).__dict__ or _ours(module, kind):
            report.unchanged.append(entry)
            continue
        attributes: dict[str, object] = {"backend": backend}
        problem = None
        if kind == "layer_norm":
            problem = _layer_norm_problem(module)
        elif kind == "attention":
            problem = _attention_problem(module)
        else:
            problem, ratio = _block_problem(module)
            attributes["sample_drop_ratio"] = getattr(module, "sample_drop_ratio", ratio)
        problem = problem or _swap(module, kind, attributes)
        if problem:
            report.left.append(PatchEntry(name, kind, entry.module_class, problem))
        else:
            report.replaced.append(entry)
    return report


def _kind(module: nn.Module) -> str | None:
    """Which kind of module patch() would consider this one, by structure; None for the rest."""
    if isinstance(module, nn.LayerNorm):
        return "layer_norm"
    if hasattr(module, "qkv") and hasattr(module, "proj") and hasattr(module, "num_heads"):
        return "attention"
    if all(hasattr(module, name) for name in ("norm1", "attn", "norm2", "mlp")):
        return "block"
    return None


def is_vit_block(module: nn.Module) -> bool:
    """Whether ``module`` is a pre-norm ViT block: ours, DINOv2's (Block, NestedTensorBlock) or
    timm's Block, patched or not (a class of one of those names in its MRO, with ``norm1, attn,
    norm2, mlp``). FSDP wrapping and activation checkpointing take these as their units."""
    if isinstance(module, Block):
        return True
    names = {cls.__name__ for cls in type(module).__mro__}
    return bool(names & set(_BLOCK_CLASS_NAMES)) and _kind(module) == "block"


def vit_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` for every :func:`is_vit_block` in ``model``, in module order (blocks
    inside DINOv2's BlockChunks included; a block inside another block is not a unit of its own)."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        inside = any(name.startswith(f"{outer}.") or outer == "" for outer, _ in found)
        if is_vit_block(module) and not inside:
            found.append((name, module))
    return found


def _class_name(cls: type) -> str:
    original = cls.__dict__.get(_ORIGINAL, cls)
    return f"{original.__module__}.{original.__qualname__}"


def unpatch(model: nn.Module) -> PatchReport:
    """Restore the modules :func:`patch` changed in ``model`` to their original classes and remove
    the attributes it added. A module wrapped again after patching (e.g. by FSDP's
    ``fully_shard``, which subclasses its class) is left, with the reason: unpatch before wrapping.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport("restored")
    for name, module in model.named_modules():
        cls = type(module)
        original = getattr(cls, _ORIGINAL, None)
        if original is None:
            continue
        kind = next(kind for kind, mixin in _MIXINS.items() if issubclass(cls, mixin))
        entry = PatchEntry(name, kind, _class_name(cls))
        if _ORIGINAL not in cls.__dict__:
            reason = f"its class {cls.__name__} wraps the patched class; unpatch before wrapping"
            report.left.append(PatchEntry(name, kind, entry.module_class, reason))
            continue
        module.__class__ = original
        for attribute in (*module.__dict__.pop(_ADDED, ()),):
            module.__dict__.pop(attribute, None)
        report.replaced.append(entry)
    return report
