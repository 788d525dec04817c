"""The CUDA kernels of csrc/ compiled for the CPU emulator (emulate.h), so that tests run them
without a GPU, as TRITON_INTERPRET=1 does for the Triton kernels.

:func:`load_emulated_extension` compiles ``csrc/bindings.cpp`` and every ``csrc/*.cu`` with g++
as C++20 host code (``-DDINOV2_FAST_EMULATE``) into the module ``_C_emulated``: the functions of
``dinov2_fast._C``, taking host (CPU tensor) addresses. Tests use it through the ``emulated_cuda``
fixture (tests/conftest.py), which makes ``backend="cuda"`` run it on CPU tensors. A new
``csrc/*.cu`` joins by itself; its kernels must launch through ``launch_kernel`` and declare
dynamic shared memory with ``DINOV2_FAST_DYNAMIC_SHARED`` (csrc/common.h), and emulate.h must
define any CUDA built-in or runtime call it adds (the build says which runtime call is missing).

Builds are cached under ``$DINOV2_FAST_EMULATOR_CACHE`` (default ``~/.cache/dinov2_fast/
cuda_emulator``), keyed by a hash of the sources, headers and compiler, behind a file lock so
that parallel test processes build once. It needs g++ (C++20), the CUDA toolkit's headers (found
from ``CUDA_HOME``/``CUDA_PATH``, nvcc on ``PATH``, or /usr/local/cuda; no libcudart) and
pybind11; without them it raises :class:`EmulatorUnavailable`, and the tests fail unless
``DINOV2_FAST_CUDA_EMULATOR=0`` says to skip them.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import functools
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CSRC = REPO / "csrc"
ENV_SWITCH = "DINOV2_FAST_CUDA_EMULATOR"
ENV_CACHE = "DINOV2_FAST_EMULATOR_CACHE"
# -O1: quick to compile, fast enough to run. Hidden symbols: each module keeps its own emulator
# state. No strict aliasing: kernels pun types freely. _FORTIFY_SOURCE would turn the fibers'
# _longjmp into a checked one that refuses to switch stacks.
CXXFLAGS = (
    "-x",
    "c++",
    "-std=c++20",
    "-O1",
    "-g0",
    "-fPIC",
    "-fvisibility=hidden",
    "-fno-strict-aliasing",
    "-U_FORTIFY_SOURCE",
    "-DDINOV2_FAST_EMULATE",
)
# Kept a week after their last use, then removed by the next build.
STALE_SECONDS = 7 * 24 * 3600


class EmulatorUnavailable(RuntimeError):
    """g++, the CUDA headers or pybind11 is missing."""


class EmulatorBuildError(RuntimeError):
    """The sources did not compile or link for the emulator."""


def enabled() -> bool:
    """False when ``DINOV2_FAST_CUDA_EMULATOR=0`` asks to skip the emulated CUDA tests."""
    return os.environ.get(ENV_SWITCH, "").strip() != "0"


@functools.cache
def load_emulated_extension() -> ModuleType:
    """``dinov2_fast._C``'s launchers built from csrc/ for the emulator (host addresses)."""
    sources = [CSRC / "bindings.cpp", *sorted(CSRC.glob("*.cu"))]
    return _load("_C_emulated", sources, ["-DDINOV2_FAST_MODULE_NAME=_C_emulated"])


@functools.cache
def load_primitive_kernels() -> ModuleType:
    """The test kernels of primitive_kernels.cu (ldmatrix, mma, shuffles, barriers, cp.async)."""
    return _load(
        "_primitives_emulated", [HERE / "primitive_bindings.cpp", HERE / "primitive_kernels.cu"]
    )


def _toolkit_roots() -> list[str]:
    """Where the CUDA toolkit may be, most specific first."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        # /usr/local/bin/nvcc may be a wrapper script: the resolved path helps only for links.
        roots += [str(Path(nvcc).resolve().parents[1]), str(Path(nvcc).parents[1])]
    roots.append("/usr/local/cuda")
    return [root for root in roots if root]


def cuda_include_dir() -> Path:
    """The CUDA toolkit's include folder (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h)."""
    for root in _toolkit_roots():
        include = Path(root) / "include"
        if (include / "cuda_runtime.h").is_file():
            return include
    raise EmulatorUnavailable(
        "the CUDA emulator needs the CUDA toolkit's headers (cuda_runtime.h, cuda_fp16.h): set "
        f"CUDA_HOME or put nvcc on PATH; searched {', '.join(_toolkit_roots())}. Set "
        f"{ENV_SWITCH}=0 to skip the emulated CUDA tests."
    )


def find_nvcc() -> str | None:
    """nvcc from PATH or the toolkit, for compiling the test kernels as real CUDA."""
    candidates = [shutil.which("nvcc"), *(str(Path(r) / "bin" / "nvcc") for r in _toolkit_roots())]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if cxx is None:
        raise EmulatorUnavailable(
            f"the CUDA emulator needs g++ (C++20) on PATH or in CXX; set {ENV_SWITCH}=0 to skip "
            "the emulated CUDA tests"
        )
    return cxx


def _pybind11_include() -> str:
    try:
        import pybind11
    except ImportError as error:
        raise EmulatorUnavailable(
            f"the CUDA emulator needs pybind11 (pip install pybind11): {error}"
        ) from error
    return pybind11.get_include()


def _cache_root() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dinov2_fast" / "cuda_emulator"


def _load(name: str, sources: Sequence[Path], defines: Sequence[str] = ()) -> ModuleType:
    cxx = _compiler()
    includes = [
        CSRC,
        HERE,
        cuda_include_dir(),
        _pybind11_include(),
        sysconfig.get_paths()["include"],
    ]
    flags = [*CXXFLAGS, *defines, *(f"-I{path}" for path in includes)]
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256("\0".join([version, *flags]).encode())
    # Every header and source a build may include: csrc/ and this folder.
    for path in sorted({*sources, *CSRC.glob("*.h"), *HERE.glob("*.h")}):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    root = _cache_root()
    build = root / f"{name}-{digest.hexdigest()[:20]}"
    module_path = build / f"{name}{sysconfig.get_config_var('EXT_SUFFIX')}"
    if not module_path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        with open(root / f"{build.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same
            if not module_path.is_file():
                _build(cxx, flags, sources, build, module_path.name)
                _remove_stale(root, name, build)
    os.utime(build)
    spec = importlib.util.spec_from_file_location(name, module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(cxx: str, flags: list[str], sources: Sequence[Path], build: Path, filename: str) -> None:
    """Compiles the sources in parallel and links them into build/filename; the folder appears
    whole (renamed from a temporary one) or not at all."""
    staging = Path(tempfile.mkdtemp(prefix=f"{build.name}.", dir=build.parent))
    try:
        objects = [staging / f"{i}_{source.stem}.o" for i, source in enumerate(sources)]
        commands = [
            [cxx, *flags, "-c", str(source), "-o", str(obj)]
            for source, obj in zip(sources, objects)
        ]
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            results = list(pool.map(_run, commands))
        failed = [(command, out) for command, (code, out) in zip(commands, results) if code]
        if failed:
            raise EmulatorBuildError(
                "compiling for the CUDA emulator failed:\n"
                + "\n\n".join(f"{' '.join(c)}\n{out[-8000:]}" for c, out in failed)
            )
        link = [cxx, "-shared", "-o", str(staging / filename), *map(str, objects)]
        code, out = _run(link)
        if code:
            raise EmulatorBuildError(f"linking for the CUDA emulator failed:\n{out[-8000:]}")
        _check_no_cuda_runtime(staging / filename)
        for obj in objects:
            obj.unlink()
        staging.rename(build)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _run(command: list[str]) -> tuple[int, str]:
    result = subprocess.run(command, capture_output=True, text=True)
    return result.returncode, result.stdout + result.stderr


def _check_no_cuda_runtime(module: Path) -> None:
    """A CUDA runtime call the emulator does not define would bind to whatever libcudart the
    process has loaded (torch's) and fail or crash there: refuse such a build."""
    nm = shutil.which("nm")
    if nm is None:
        return
    code, out = _run([nm, "-D", "--undefined-only", str(module)])
    names = sorted({line.split()[-1] for line in out.splitlines() if line.split()})
    missing = [n for n in names if n.startswith(("cu", "__cuda"))]
    if code == 0 and missing:
        raise EmulatorBuildError(
            f"the kernels call CUDA runtime functions the emulator does not define: "
            f"{', '.join(missing)}; add them to tests/cuda_emulator/emulate.h"
        )


def _remove_stale(root: Path, name: str, keep: Path) -> None:
    for old in root.glob(f"{name}-*"):
        if old != keep and time.time() - old.stat().st_mtime > STALE_SECONDS:
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)


__all__ = [
    "EmulatorBuildError",
    "EmulatorUnavailable",
    "cuda_include_dir",
    "enabled",
    "find_nvcc",
    "load_emulated_extension",
    "load_primitive_kernels",
]
