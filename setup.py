"""Build driver: builds dinov2_fast._C from csrc/ through CMakeLists.txt when a CUDA toolkit is found.

Environment:
  DINOV2_FAST_CUDA=0        skip the CUDA build (pure-Python install: Triton and torch backends only)
  DINOV2_FAST_CUDA=1        force it: fail loudly if nvcc, cmake or pybind11 is missing or the build fails
  (unset)                   build when nvcc is found, otherwise install the pure-Python package and say why
  DINOV2_FAST_CUDA_ARCHS    CMake CUDA architectures, default "80;90a"
  CUDACXX / CUDA_HOME       where nvcc is, if it is not on PATH
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "80;90a"


def _say(message: str) -> None:
    # pip shows a build's output with -v; stderr keeps it out of any captured stdout.
    print(f"dinov2-fast setup: {message}", file=sys.stderr, flush=True)


def find_nvcc() -> str | None:
    candidates = [os.environ.get("CUDACXX")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(str(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def _find_tool(name: str, wheel: str, bin_dir_attribute: str) -> str | None:
    """The executable from its wheel in the build requirements, else from PATH."""
    try:
        module = importlib.import_module(wheel)
        path = Path(getattr(module, bin_dir_attribute)) / name
        if path.is_file():
            return str(path)
    except (ImportError, AttributeError):
        pass
    return shutil.which(name)


def find_cmake() -> str | None:
    return _find_tool("cmake", "cmake", "CMAKE_BIN_DIR")


def find_ninja() -> str | None:
    return _find_tool("ninja", "ninja", "BIN_DIR")


def _cuda_build_plan() -> tuple[bool, str]:
    """Return (build, reason). Raises when the build is forced but impossible."""
    mode = os.environ.get("DINOV2_FAST_CUDA", "").strip()
    if mode not in ("", "0", "1"):
        raise SystemExit(f"DINOV2_FAST_CUDA must be 0, 1 or unset, got {mode!r}")
    if mode == "0":
        return False, "DINOV2_FAST_CUDA=0: skipping the CUDA extension"
    missing = []
    if find_nvcc() is None:
        missing.append("nvcc (set CUDACXX or CUDA_HOME, or put nvcc on PATH)")
    if find_cmake() is None:
        missing.append("cmake")
    try:
        import pybind11  # noqa: F401
    except ImportError:
        missing.append("pybind11")
    if missing:
        reason = "CUDA extension not built: missing " + ", ".join(missing)
        if mode == "1":
            raise SystemExit(f"DINOV2_FAST_CUDA=1 but {reason}")
        return False, reason + "; installing the pure-Python package (Triton and torch backends)"
    return True, "building the CUDA extension dinov2_fast._C"


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        output_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("DINOV2_FAST_CUDA_ARCHS", DEFAULT_ARCHS)
        cmake = find_cmake()
        configure = [
            cmake,
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={find_nvcc()}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DDINOV2_FAST_CUDA_ARCHS={archs}",
            f"-DDINOV2_FAST_OUTPUT_DIR={output_dir}",
        ]
        ninja = find_ninja()
        if ninja is not None:
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        _say(f"CUDA architectures {archs}")
        subprocess.run(configure, check=True)
        jobs = str(max(1, os.cpu_count() or 1))
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)
        built = output_dir / Path(self.get_ext_fullpath(ext.name)).name
        if not built.is_file():
            raise RuntimeError(f"CMake finished but {built} was not produced")


# Guarded so that tests can import the tool finders; pip and `python setup.py` run it as __main__.
if __name__ == "__main__":
    build_cuda, why = _cuda_build_plan()
    _say(why)
    setup(
        ext_modules=[CMakeExtension("dinov2_fast._C")] if build_cuda else [],
        cmdclass={"build_ext": CMakeBuild},
    )
