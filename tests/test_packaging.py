"""The install path: setup.py's CUDA build switch and what a wheel contains."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _setup_py(*args, **env):
    return subprocess.run(
        [sys.executable, "setup.py", *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cuda_build_can_be_skipped():
    out = _setup_py("--version", DINOV2_FAST_CUDA="0")
    assert out.returncode == 0, out.stderr
    assert "DINOV2_FAST_CUDA=0: skipping the CUDA extension" in out.stderr


def test_unknown_switch_value_is_refused():
    out = _setup_py("--version", DINOV2_FAST_CUDA="yes")
    assert out.returncode != 0
    assert "DINOV2_FAST_CUDA must be 0, 1 or unset, got 'yes'" in out.stderr


@pytest.mark.slow
def test_pure_python_wheel_maps_kernels_into_the_package(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            ".",
        ],
        cwd=REPO,
        env={**os.environ, "DINOV2_FAST_CUDA": "0"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (wheel,) = tmp_path.glob("dinov2_fast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "dinov2_fast/__init__.py",
        "dinov2_fast/kernels/__init__.py",
        "dinov2_fast/kernels/layer_norm.py",
        "dinov2_fast/ops/layer_norm.py",
        "dinov2_fast/nn/layer_norm.py",
        "dinov2_fast/cli.py",
        "dinov2_fast/patch.py",
        "dinov2_fast/models/vision_transformer.py",
        "dinov2_fast/fsdp/sharding.py",
        "dinov2_fast/train/trainer.py",
        # The presets ship as package data: `pip install .` then `dinov2-fast train --config demo`.
        *(f"dinov2_fast/train/configs/{name}.yaml" for name in ("default", "demo", "vitl14")),
        "dinov2_fast/kernels/prototype_cross_entropy.py",
        # The measured defaults of backend="auto" ship as package data.
        "dinov2_fast/backend_table.py",
        "dinov2_fast/backend_table_h100.json",
        "dinov2_fast/benchmark/tune.py",
    ):
        assert expected in names, expected
    assert not any(name.endswith(".so") for name in names), "DINOV2_FAST_CUDA=0 built an extension"
    assert not any(name.startswith(("tests/", "bench/", "csrc/")) for name in names)
