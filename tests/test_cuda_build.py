"""The CUDA extension builds from csrc/ with CMake + nvcc and exposes its launchers.

No GPU needed: the build runs nvcc for every architecture in CMakeLists.txt ("80;90a") into a
temporary folder, and the calls made here are rejected (bad dtype tag, bad dim) or return
(rows == 0) before any CUDA work. Each check runs in a subprocess, so the freshly built `_C` never
meets an installed `dinov2_fast._C` in this interpreter. Numerical checks of the kernels live in
the GPU tests of each op.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = (
    "layer_norm_fwd",
    "layer_norm_bwd_partial_rows",
    "layer_norm_bwd",
    "inverse_index_workspace_size",
    "index_select_rows",
    "index_scatter_rows",
    "scaled_index_add_fwd",
    "scaled_index_add_bwd_partial_rows",
    "scaled_index_add_bwd",
    "index_select_layer_norm_fwd",
    "attention_fwd",
    "attention_bwd",
)


def _setup_py():
    """setup.py as a module: its finders for nvcc, cmake and ninja are the ones pip's build uses."""
    spec = importlib.util.spec_from_file_location("dinov2_fast_setup", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pybind11_cmake_dir() -> str | None:
    try:
        import pybind11
    except ImportError:
        return None
    return pybind11.get_cmake_dir()


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO
    )


@pytest.fixture(scope="module")
def built_extension_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Configures and builds csrc/ once per module; returns the folder holding `_C`."""
    tools = _setup_py()
    nvcc = tools.find_nvcc()
    cmake = tools.find_cmake()
    pybind11_dir = _pybind11_cmake_dir()
    missing = [
        name
        for name, found in (("nvcc", nvcc), ("cmake", cmake), ("pybind11", pybind11_dir))
        if found is None
    ]
    if missing:
        pytest.skip(f"cannot build the CUDA extension: {', '.join(missing)} not found")
    build_dir = tmp_path_factory.mktemp("cmake_build")
    out_dir = build_dir / "out"
    configure = [
        cmake,
        "-S",
        str(REPO),
        "-B",
        str(build_dir),
        f"-DCMAKE_CUDA_COMPILER={nvcc}",
        f"-Dpybind11_DIR={pybind11_dir}",
        f"-DPython_EXECUTABLE={sys.executable}",
        f"-DDINOV2_FAST_OUTPUT_DIR={out_dir}",
    ]
    ninja = tools.find_ninja()
    if ninja is not None:
        configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    build = [cmake, "--build", str(build_dir), "--parallel", str(os.cpu_count() or 1)]
    for command in (configure, build):
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, (
            f"{' '.join(command)} failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
        )
    assert list(out_dir.glob("_C*")), f"the build produced no _C module in {out_dir}"
    return out_dir


INSTALLED_IMPORT = "import dinov2_fast._C as _C\n"


@functools.cache
def _installed_import_error() -> str | None:
    """None when the installed extension imports, else the last line of the error."""
    probe = _run_python(INSTALLED_IMPORT)
    if probe.returncode == 0:
        return None
    return (probe.stderr.strip().splitlines() or ["no error output"])[-1]


@pytest.fixture(params=["installed", pytest.param("fresh_build", marks=pytest.mark.slow)])
def import_c(request: pytest.FixtureRequest) -> str:
    """Python source that imports the extension as `_C`: the installed one or a fresh build."""
    if request.param == "installed":
        error = _installed_import_error()
        if error is not None:
            pytest.skip(f"dinov2_fast._C is not importable: {error}")
        return INSTALLED_IMPORT
    out_dir = request.getfixturevalue("built_extension_dir")
    return f"import sys\nsys.path.insert(0, {str(out_dir)!r})\nimport _C\n"


def _check(import_source: str, body: str) -> None:
    result = _run_python(import_source + textwrap.dedent(body) + "\nprint('ok')\n")
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )


@pytest.mark.slow
def test_build_exposes_the_launchers(built_extension_dir: Path) -> None:
    out_dir = built_extension_dir
    _check(
        f"import sys\nsys.path.insert(0, {str(out_dir)!r})\nimport _C\n",
        f"""
        assert _C.__file__.startswith({str(out_dir)!r}), _C.__file__
        for name in {LAUNCHERS!r}:
            assert callable(getattr(_C, name)), name
        """,
    )


def test_unknown_dtype_tag_raises_value_error(import_c: str) -> None:
    # Tags are checked before any CUDA call, so this holds without a GPU.
    _check(
        import_c,
        """
        def expect_value_error(call, name):
            try:
                call()
            except ValueError as error:
                assert name in str(error) and "dtype" in str(error), str(error)
            else:
                raise AssertionError(f"{name} accepted a bad dtype tag")

        fwd = lambda x_dtype, y_dtype: _C.layer_norm_fwd(
            0, 0, 0, 0, 0, 0, 8, 1024, 1024, 1024, 1e-6, x_dtype, y_dtype, 0
        )
        bwd = lambda x_dtype, dy_dtype: _C.layer_norm_bwd(
            0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 1024, 1024, 1024, 1024, x_dtype, dy_dtype, 0, 0
        )
        for bad in (3, -1):
            expect_value_error(lambda: fwd(bad, 2), "layer_norm_fwd")
            expect_value_error(lambda: fwd(2, bad), "layer_norm_fwd")
            expect_value_error(lambda: bwd(bad, 2), "layer_norm_bwd")
            expect_value_error(lambda: bwd(2, bad), "layer_norm_bwd")
            expect_value_error(
                lambda: _C.layer_norm_bwd_partial_rows(8, 1024, bad, 0),
                "layer_norm_bwd_partial_rows",
            )
        """,
    )


def test_bad_dim_raises_runtime_error_naming_the_kernel(import_c: str) -> None:
    # The launchers reject dim outside [1, 16384] and return at rows == 0 before any CUDA call.
    _check(
        import_c,
        """
        for dim in (0, 16385):
            try:
                _C.layer_norm_fwd(0, 0, 0, 0, 0, 0, 8, dim, dim, dim, 1e-6, 2, 2, 0)
            except RuntimeError as error:
                assert str(error).startswith("layer_norm_fwd: CUDA error: "), str(error)
            else:
                raise AssertionError(f"layer_norm_fwd accepted dim={dim}")
            try:
                _C.layer_norm_bwd(0, 0, 0, 0, 0, 0, 0, 0, 0, 8, dim, dim, dim, dim, 2, 2, 0, 0)
            except RuntimeError as error:
                assert str(error).startswith("layer_norm_bwd: CUDA error: "), str(error)
            else:
                raise AssertionError(f"layer_norm_bwd accepted dim={dim}")
        assert _C.layer_norm_fwd(0, 0, 0, 0, 0, 0, 0, 768, 768, 768, 1e-6, 0, 2, 0) is None
        assert _C.layer_norm_bwd(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 768, 768, 768, 768, 0, 2, 0, 0) is None
        """,
    )


def test_partial_rows_is_stable(import_c: str) -> None:
    # Without a GPU the SM count falls back to a default; either way the count must not change
    # between calls, and one row tile needs one partial row.
    _check(
        import_c,
        """
        counts = {_C.layer_norm_bwd_partial_rows(16448, 1024, 2, 0) for _ in range(3)}
        assert len(counts) == 1 and 1 <= counts.pop() <= 4096, counts
        assert _C.layer_norm_bwd_partial_rows(1, 1024, 2, 0) == 1
        assert _C.layer_norm_bwd_partial_rows(3, 16384, 0, 0) == 3
        """,
    )
