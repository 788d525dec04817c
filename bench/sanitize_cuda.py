"""Every op that has a CUDA kernel, once forward and backward with backend="cuda", on small odd
shapes: the program that bench/gpu_check.sh runs under compute-sanitizer (step ``sanitize``).

    compute-sanitizer --tool memcheck --error-exitcode 1 --kernel-name kns=dinov2_fast \
        python bench/sanitize_cuda.py
    python bench/sanitize_cuda.py --list           # the kernels and the cases, running nothing

Shapes are tiny (racecheck instruments every shared-memory access) and odd: 77 tokens (a ragged
last tile), widths that are not multiples of the vector width, crop groups of different sizes.
Each case's output and gradients are also checked against backend="torch" on the same inputs, so
a kernel that writes garbage without touching memory it should not still fails. An op without a
CUDA kernel (not in ``_backend.AUTO_PREFERENCE``) is reported as skipped. Exit status: 0 when
every case ran and matched, 1 otherwise (also when the extension is not built or no case ran).
Run with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` so that every tensor is its own allocation and
memcheck sees reads past its end (gpu_check.sh sets it).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `__global__ void [__launch_bounds__(...)] name(`; launch bounds may hold one level of parentheses.
_KERNEL = re.compile(
    r"__global__\s+void\s+(?:__launch_bounds__\((?:[^()]|\([^()]*\))*\)\s*)?(\w+)\s*\("
)


def kernel_names(folder: Path = ROOT / "csrc") -> list[str]:
    """The names of the ``__global__`` functions in ``folder``'s .cu files, sorted."""
    names = {name for path in folder.glob("*.cu") for name in _KERNEL.findall(path.read_text())}
    return sorted(names)


# --- the cases -----------------------------------------------------------------------------------

Case = tuple[str, str, Callable[[str], list]]  # (op, description, run(backend) -> tensors)
SEQLEN = 77  # not a multiple of any tile: the last tile is ragged


def cases(device: str = "cuda") -> Iterator[Case]:
    """The cases; each ``run(backend)`` makes its seeded inputs (the same for every backend) on
    ``device`` (the GPU; the CPU for tests/cuda_emulator) and returns the output and the
    gradients."""
    import torch

    from dinov2_fast import ops

    def randn(*size, dtype=torch.float32, seed=0):
        generator = torch.Generator(device=device).manual_seed(seed)
        return torch.randn(*size, generator=generator, device=device).to(dtype).requires_grad_()

    def forward_backward(out, leaves, seed=99):
        generator = torch.Generator(device=device).manual_seed(seed)
        dout = torch.randn(out.shape, generator=generator, device=device).to(out.dtype)
        grads = torch.autograd.grad(out, leaves, dout)
        return [out, *grads]

    for dtype in (torch.float16, torch.bfloat16):
        for head_dim in (64, 128):

            def dense(backend, dtype=dtype, head_dim=head_dim):
                qkv = randn(2, SEQLEN, 3, 2, head_dim, dtype=dtype)
                return forward_backward(ops.attention_qkvpacked(qkv, backend=backend), [qkv])

            yield "attention", f"dense qkv [2, {SEQLEN}, 3, 2, {head_dim}] {dtype}", dense
            seqlens = (SEQLEN, 13, 5)

            def packed(backend, dtype=dtype, head_dim=head_dim, seqlens=seqlens):
                qkv = randn(sum(seqlens), 3, 2, head_dim, dtype=dtype)
                offsets = [0]
                for length in seqlens:
                    offsets.append(offsets[-1] + length)
                cu_seqlens = torch.tensor(offsets, dtype=torch.int32, device=device)
                out = ops.attention_qkvpacked(
                    qkv, cu_seqlens=cu_seqlens, max_seqlen=max(seqlens), backend=backend
                )
                return forward_backward(out, [qkv])

            yield "attention", f"packed qkv {seqlens}, 2 heads of {head_dim} {dtype}", packed

            def separate(backend, dtype=dtype, head_dim=head_dim):
                q, k, v = (randn(1, SEQLEN, 3, head_dim, dtype=dtype, seed=s) for s in (1, 2, 3))
                return forward_backward(ops.attention(q, k, v, backend=backend), [q, k, v])

            yield "attention", f"q, k, v [1, {SEQLEN}, 3, {head_dim}] {dtype}", separate

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for width in (100, 384, 1000):  # 100 and 1000: not multiples of a 16-byte vector

            def norm(backend, dtype=dtype, width=width):
                x = randn(37, width, dtype=dtype)
                weight, bias = randn(width, dtype=dtype, seed=1), randn(width, dtype=dtype, seed=2)
                out = ops.layer_norm(x, weight, bias, backend=backend)
                return forward_backward(out, [x, weight, bias])

            yield "layer_norm", f"[37, {width}] {dtype}", norm

    def norm_autocast(backend):
        x, weight, bias = randn(37, 1000), randn(1000, seed=1), randn(1000, seed=2)
        with torch.autocast(device, dtype=torch.bfloat16):
            out = ops.layer_norm(x, weight, bias, backend=backend)
        return forward_backward(out, [x, weight, bias])

    yield "layer_norm", "[37, 1000] fp32 under bf16 autocast", norm_autocast

    groups = ((7, 13, 100), (5, 3, 100))
    picks = ([6, 0, 3, 4], [2])
    for dtype in (torch.float32, torch.bfloat16):

        def gather(backend, dtype=dtype):
            sources = [randn(*shape, dtype=dtype, seed=i) for i, shape in enumerate(groups)]
            indices = [torch.tensor(pick, device=device) for pick in picks]
            out = ops.index_select_cat(sources, indices, backend=backend)
            return forward_backward(out, sources)

        yield "index_select_cat", f"groups {groups} {dtype}", gather

        def gather_norm(backend, dtype=dtype):
            sources = [randn(*shape, dtype=dtype, seed=i) for i, shape in enumerate(groups)]
            indices = [torch.tensor(pick, device=device) for pick in picks]
            weight, bias = randn(100, seed=8), randn(100, seed=9)
            with torch.autocast(device, dtype=torch.bfloat16):
                out = ops.index_select_layer_norm(sources, indices, weight, bias, backend=backend)
            return forward_backward(out, [*sources, weight, bias])

        yield "index_select_layer_norm", f"groups {groups} {dtype}, bf16 autocast", gather_norm

    for x_dtype in (torch.float32, torch.bfloat16):
        for inplace in (False, True):

            def add(backend, x_dtype=x_dtype, inplace=inplace):
                x = randn(7, 13, 100, dtype=x_dtype)
                source = randn(4, 13, 100, dtype=torch.bfloat16, seed=1)
                gamma = (0.5 + randn(100, seed=2).detach().abs()).requires_grad_()
                index = torch.tensor([6, 0, 3, 4], device=device)
                # In place it adds into a copy: a leaf that requires grad cannot change in place.
                target = x.clone() if inplace else x
                out = ops.scaled_index_add(
                    target, index, source, gamma, 1.75, inplace=inplace, backend=backend
                )
                return forward_backward(out, [x, source, gamma])

            where = "in place" if inplace else "out of place"
            yield "scaled_index_add", f"x [7, 13, 100] {x_dtype}, source bf16, {where}", add


# --- running -------------------------------------------------------------------------------------


def _tolerance(t) -> float:
    import torch

    return {torch.float16: 6e-3, torch.bfloat16: 3e-2}.get(t.dtype, 1e-4)


def _compare(outs: list, refs: list) -> str:
    """ "" when each tensor is finite and within its dtype's tolerance of the reference."""
    for i, (out, ref) in enumerate(zip(outs, refs)):
        out, ref = out.detach().double(), ref.detach().double()
        if not bool(out.isfinite().all()):
            return f"tensor {i} (0: the output, then gradients) is not finite"
        error = (out - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)
        if error > 8 * _tolerance(outs[i]):  # gradients are sums: a loose bound, not a test
            return f"tensor {i} differs from backend='torch' by {error:.1e} (relative to its max)"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    args = parser.parse_args(argv)
    import torch

    from dinov2_fast import _backend

    if args.list:
        print(f"our kernels (csrc/*.cu): {', '.join(kernel_names())}")
        for op, description, _ in cases():
            cuda = "cuda" in _backend.AUTO_PREFERENCE[op]
            print(f"{op:<24} {description}{'' if cuda else '  (no CUDA kernel: skipped)'}")
        return 0
    if not torch.cuda.is_available():
        print("sanitize_cuda: needs a CUDA GPU", file=sys.stderr)
        return 1
    why = _backend.unavailable_reason("cuda", torch.device("cuda"))
    if why:
        print(f"sanitize_cuda: {why}", file=sys.stderr)
        return 1
    ran = failed = 0
    skipped: set[str] = set()
    for op, description, run in cases():
        if "cuda" not in _backend.AUTO_PREFERENCE[op]:
            skipped.add(op)
            continue
        try:
            outs = run("cuda")
            torch.cuda.synchronize()
            problem = _compare(outs, run("torch"))
        except Exception as error:  # report every case, then fail
            problem = f"{type(error).__name__}: {error}".splitlines()[0]
        ran += 1
        failed += bool(problem)
        print(f"FAILED {op} {description}: {problem}" if problem else f"ok     {op} {description}")
    for op in sorted(skipped):
        print(f"skipped {op}: no CUDA kernel (not in _backend.AUTO_PREFERENCE)")
    print(f"sanitize_cuda: {ran} cases ran, {failed} failed, ops skipped: {len(skipped)}")
    return 1 if failed or not ran else 0


if __name__ == "__main__":
    raise SystemExit(main())
