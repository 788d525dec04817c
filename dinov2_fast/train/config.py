"""Training configurations: YAML presets with DINOv2's keys, and ``key=value`` overrides.

A configuration is ``configs/default.yaml`` (DINOv2's defaults), then a preset's file (``demo``,
``vits14``, ``vitb14``, ``vitl14``, ``vitg14``, or a path to a YAML file of your own), then the
overrides, in that order. Overrides use dotted keys and YAML values: ``optim.base_lr=1e-3``,
``crops.global_crops_scale=[0.3,1.0]``, ``train.dataset=synthetic``. A key that is not in the
defaults is an error (with the closest known keys), so that a typo never trains silently with the
default.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

__all__ = ["PRESETS", "Config", "apply_overrides", "load_config", "save_config"]

PRESETS = ("demo", "vits14", "vitb14", "vitl14", "vitg14")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


class Config(dict):
    """A nested dict whose keys read as attributes too: ``cfg.optim.base_lr``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def __deepcopy__(self, memo) -> Config:
        return _wrap(copy.deepcopy(_plain(self), memo))

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)


def _wrap(value: Any) -> Any:
    if isinstance(value, Mapping):
        return Config({key: _wrap(item) for key, item in value.items()})
    if isinstance(value, list):
        return [_wrap(item) for item in value]
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"{origin} is not valid YAML: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{origin} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _preset_text(name: str) -> str:
    return resources.files("dinov2_fast.train").joinpath("configs", f"{name}.yaml").read_text()


def _merge(base: dict[str, Any], update: Mapping[str, Any], origin: str, prefix: str = "") -> None:
    """Update ``base`` in place; every key of ``update`` must exist in ``base``."""
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            known = [f"{prefix}{k}" for k in base]
            close = difflib.get_close_matches(dotted, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"{origin}: unknown config key {dotted!r}{hint}")
        if isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise ValueError(f"{origin}: {dotted} is a section, got {value!r}")
            _merge(base[key], value, origin, f"{dotted}.")
        else:
            base[key] = value


def apply_overrides(config: Mapping[str, Any], overrides: Iterable[str]) -> Config:
    """A copy of ``config`` with ``key=value`` overrides (dotted keys, YAML values) applied."""
    merged = _plain(config)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"an override must look like key=value, got {item!r}")
        value = yaml.safe_load(text) if text.strip() else None
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        nested: Any = value
        for part in reversed(key.strip().split(".")):
            nested = {part: nested}
        _merge(merged, nested, f"override {item!r}")
    return _wrap(merged)


def load_config(preset: str | Path = "demo", overrides: Iterable[str] = ()) -> Config:
    """The defaults, then ``preset`` (a name in :data:`PRESETS` or a YAML file), then ``overrides``.

    Raises:
        ValueError: an unknown preset name, a YAML file that is not a mapping, a bad override.
        FileNotFoundError: a preset path that does not exist.
        KeyError: a key that is not in the defaults (the message lists the closest ones).
    """
    config = _read_yaml(_preset_text("default"), "configs/default.yaml")
    if str(preset) in PRESETS:
        text, origin = _preset_text(str(preset)), f"preset {preset}"
    elif str(preset).endswith((".yaml", ".yml")):
        path = Path(preset)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        text, origin = path.read_text(), str(path)
    else:
        raise ValueError(
            f"config must be one of {', '.join(PRESETS)} or a .yaml file, got {preset!r}"
        )
    _merge(config, _read_yaml(text, origin), origin)
    return apply_overrides(config, overrides)


def save_config(config: Mapping[str, Any], path: str | Path) -> Path:
    """Write the resolved configuration as YAML (next to the checkpoints)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(_plain(config), sort_keys=False))
    return target
