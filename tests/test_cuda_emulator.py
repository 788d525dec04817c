"""The CPU emulator of the CUDA kernels (tests/cuda_emulator): its primitives against the CUDA and
PTX documentation, the errors it reports, and csrc/'s LayerNorm run through it.

The expected values are written from the documentation (PTX ISA "ldmatrix", "Matrix fragments
for mma.m16n8k16"; CUDA C++ Programming Guide "Warp shuffle functions"), not from the emulator.
The test kernels (primitive_kernels.cu) are real CUDA: a test compiles them for sm_80.
"""

from __future__ import annotations

import re
import subprocess

import pytest
import torch
from cuda_emulator import CSRC, HERE, enabled, find_nvcc, load_primitive_kernels
from test_layer_norm import _check_against_reference, _inputs

from dinov2_fast import _backend

LANES = 32
POISON32 = 0xFFFFFFFF


@pytest.fixture(scope="module")
def kernels():
    if not enabled():
        pytest.skip("DINOV2_FAST_CUDA_EMULATOR=0: the emulated CUDA tests are off")
    return load_primitive_kernels()


def _u32(values) -> list[int]:
    """A tensor's 32-bit words as unsigned ints."""
    return [v & 0xFFFFFFFF for v in values.view(torch.int32).flatten().tolist()]


def _int32(words: list[int]) -> torch.Tensor:
    """Unsigned 32-bit words as an int32 tensor (the same bits)."""
    return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)


# --- ldmatrix ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant, matrices, trans",
    [(0, 4, False), (1, 4, True), (2, 2, False), (3, 2, True)],
    ids=["x4", "x4_trans", "x2", "x2_trans"],
)
def test_ldmatrix_follows_the_ptx_layout(kernels, variant, matrices, trans):
    # 40 rows of 24 16-bit elements with distinct values; each lane points at a random row and
    # one of its three 16-byte columns, so rows are neither contiguous nor in order.
    row_elems = 24
    tile = torch.randperm(40 * row_elems, dtype=torch.int32).to(torch.int16)
    rows = torch.randperm(40)[:LANES]
    offsets = (rows * row_elems + 8 * torch.randint(0, 3, (LANES,))).to(torch.int32)
    out = torch.full((LANES, 4), -1, dtype=torch.int32)
    kernels.ldmatrix(tile.data_ptr(), tile.numel(), offsets.data_ptr(), variant, out.data_ptr())

    # PTX: the rows of matrix i start at the addresses of lanes 8i .. 8i+7; a group of four lanes
    # holds one row, lane l elements (l // 4, 2 (l % 4)) and (l // 4, 2 (l % 4) + 1) of matrix i
    # in register i, lower column in the low half. .trans loads the matrix column-major.
    def element(matrix, row, col):
        return int(tile[offsets[8 * matrix + row] + col]) & 0xFFFF

    expected = [[POISON32] * 4 for _ in range(LANES)]
    for lane in range(LANES):
        group, in_group = divmod(lane, 4)
        for i in range(matrices):
            if trans:
                lo, hi = element(i, 2 * in_group, group), element(i, 2 * in_group + 1, group)
            else:
                lo, hi = element(i, group, 2 * in_group), element(i, group, 2 * in_group + 1)
            expected[lane][i] = lo | hi << 16
    assert [_u32(row) for row in out] == expected


# --- mma ----------------------------------------------------------------------------------------

# PTX ISA, "Matrix fragments for mma.m16n8k16 with floating point type", with
# g = lane >> 2 and t = lane % 4; element i of a fragment, two per 32-bit register (low half
# first).


def _a_element(lane: int, i: int) -> tuple[int, int]:
    g, t = divmod(lane, 4)
    row = g if i < 2 or 4 <= i < 6 else g + 8
    col = t * 2 + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def _b_element(lane: int, i: int) -> tuple[int, int]:
    g, t = divmod(lane, 4)
    return t * 2 + (i & 1) + (8 if i >= 2 else 0), g


def _c_element(lane: int, i: int) -> tuple[int, int]:
    g, t = divmod(lane, 4)
    return g if i < 2 else g + 8, t * 2 + (i & 1)


def _fragments(matrix: torch.Tensor, element, count: int) -> torch.Tensor:
    """The lanes' registers [32, count / 2] holding a 16-bit matrix."""
    bits = matrix.view(torch.int16).to(torch.int64) & 0xFFFF
    words = []
    for lane in range(LANES):
        halves = [int(bits[element(lane, i)]) for i in range(count)]
        words += [halves[j] | halves[j + 1] << 16 for j in range(0, count, 2)]
    return _int32(words).view(LANES, count // 2)


def _run_mma(kernels, a, b, c, dtype):
    a_regs, b_regs = _fragments(a, _a_element, 8), _fragments(b, _b_element, 4)
    c_regs = torch.tensor([[float(c[_c_element(lane, i)]) for i in range(4)] for lane in range(32)])
    d_regs = torch.full((LANES, 4), float("nan"))
    tag = {torch.float16: 1, torch.bfloat16: 2}[dtype]
    kernels.mma(a_regs.data_ptr(), b_regs.data_ptr(), c_regs.data_ptr(), d_regs.data_ptr(), tag)
    d = torch.full((16, 8), float("nan"))
    for lane in range(LANES):
        for i in range(4):
            d[_c_element(lane, i)] = d_regs[lane, i]
    return d


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mma_follows_the_ptx_layout(kernels, dtype):
    # Small integers: every product and sum is exact, so any misplaced element shows.
    a = torch.randint(-8, 9, (16, 16)).to(dtype)
    b = torch.randint(-8, 9, (16, 8)).to(dtype)
    c = torch.randint(-64, 65, (16, 8)).float()
    d = _run_mma(kernels, a, b, c, dtype)
    assert torch.equal(d, (a.double() @ b.double() + c.double()).float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mma_sums_exact_products_in_fp32(kernels, dtype):
    a, b = torch.randn(16, 16).to(dtype), torch.randn(16, 8).to(dtype)
    c = torch.randn(16, 8)
    d = _run_mma(kernels, a, b, c, dtype)
    expected = a.double() @ b.double() + c.double()
    magnitude = a.double().abs() @ b.double().abs() + c.double().abs()
    assert ((d.double() - expected).abs() <= 17 * torch.finfo(torch.float32).eps * magnitude).all()


# --- shuffles and votes ---------------------------------------------------------------------------

MODES = {"idx": 0, "up": 1, "down": 2, "xor": 3}


def _shuffle_source(mode: str, lane: int, arg: int, width: int) -> int:
    """The lane whose value `lane` gets (CUDA C++ Programming Guide, warp shuffle functions)."""
    first = lane - lane % width
    if mode == "idx":  # srcLane modulo width, within the lane's group
        return first + arg % width
    if mode == "up":  # lanes within delta of their group's start keep their own value
        return lane - arg if lane % width >= arg else lane
    if mode == "down":
        return lane + arg if lane % width + arg < width else lane
    source = lane ^ arg  # xor: earlier groups may be read, later ones (or past the warp) not
    return source if source < LANES and source // width <= lane // width else lane


@pytest.mark.parametrize("as_float", [True, False], ids=["float", "uint"])
@pytest.mark.parametrize("mode", MODES)
def test_shuffles_follow_cuda_semantics(kernels, mode, as_float):
    threads = 2 * LANES  # two warps: each shuffles within itself
    values = _int32([0x3F800000 + 977 * i for i in range(threads)])  # distinct finite floats
    for width in (32, 16, 8, 4, 2, 1):
        high = 40 if mode in ("idx", "xor") else 34
        args = torch.randint(-3 if mode == "idx" else 0, high, (threads,), dtype=torch.int32)
        out = torch.full((threads,), -1, dtype=torch.int32)
        kernels.shuffle(
            values.data_ptr(), args.data_ptr(), out.data_ptr(), threads, MODES[mode], width,
            0xFFFFFFFF, as_float,
        )  # fmt: skip
        expected = []
        for i in range(threads):
            warp, lane = divmod(i, LANES)
            source = _shuffle_source(mode, lane, int(args[i]), width)
            expected.append(int(values[warp * LANES + source]))
        assert out.tolist() == expected, f"width {width}"


def test_shuffle_from_a_lane_outside_the_mask_is_poison(kernels):
    # Undefined in CUDA; the emulator returns all-ones bits so that a use shows. Lanes outside
    # the mask do not call and keep their input.
    values = _int32(list(range(100, 132)))
    mask = 0x0000FFFF
    for xor, inside in ((1, True), (16, False)):
        args = torch.full((LANES,), xor, dtype=torch.int32)
        out = torch.zeros(LANES, dtype=torch.int32)
        kernels.shuffle(
            values.data_ptr(), args.data_ptr(), out.data_ptr(), LANES, 3, 32, mask, False
        )
        low = [100 + (lane ^ xor) if inside else -1 for lane in range(16)]
        assert out.tolist() == low + list(range(116, 132))


def test_shuffle_in_a_partial_warp(kernels):
    # 48 threads: the second warp has lanes 0-15 only; reading a lane that does not exist gives
    # poison, reading an existing one works.
    threads = 48
    values = _int32(list(range(threads)))
    for mode, arg, expected_tail in (("xor", 1, [33, 32]), ("down", 16, [-1, -1])):
        args = torch.full((threads,), arg, dtype=torch.int32)
        out = torch.zeros(threads, dtype=torch.int32)
        kernels.shuffle(
            values.data_ptr(), args.data_ptr(), out.data_ptr(), threads, MODES[mode], 32,
            0xFFFFFFFF, False,
        )  # fmt: skip
        assert out[32:34].tolist() == expected_tail, mode


@pytest.mark.parametrize("mask", [0xFFFFFFFF, 0x0F0F0F0F])
def test_votes(kernels, mask):
    threads = 2 * LANES
    predicate = (torch.rand(threads) < 0.5).to(torch.int32)
    predicate[LANES:] = 1  # the second warp agrees
    out = torch.full((threads, 3), 7, dtype=torch.int32)
    kernels.vote(predicate.data_ptr(), out.data_ptr(), threads, mask)
    for warp in range(2):
        members = [lane for lane in range(LANES) if mask >> lane & 1]
        ballot = sum(1 << lane for lane in members if predicate[warp * LANES + lane])
        for lane in range(LANES):
            got = _u32(out[warp * LANES + lane])
            if lane in members:
                assert got == [
                    ballot,
                    int(ballot != 0),
                    int(ballot == sum(1 << m for m in members)),
                ]
            else:
                assert got == [0, 0, 0]


# --- blocks, barriers and memory -----------------------------------------------------------------


@pytest.mark.parametrize("grid, block", [((2, 3, 2), (4, 3, 2)), ((3, 1, 1), (1024, 1, 1))])
def test_indices_and_barriers(kernels, grid, block):
    threads = block[0] * block[1] * block[2]
    blocks = grid[0] * grid[1] * grid[2]
    out = torch.full((blocks * threads, 8), -1, dtype=torch.int32)
    kernels.indices(grid, block, out.data_ptr())
    expected = []
    for bz in range(grid[2]):
        for by in range(grid[1]):
            for bx in range(grid[0]):
                linear_block = bx + grid[0] * (by + grid[1] * bz)
                for tz in range(block[2]):
                    for ty in range(block[1]):
                        for tx in range(block[0]):
                            t = tx + block[0] * (ty + block[1] * tz)
                            neighbour = 7 * ((t + 1) % threads) + 1000 * linear_block
                            expected.append([tx, ty, tz, bx, by, bz, neighbour, threads // 2])
    assert out.tolist() == expected


def test_cp_async_lands_at_its_wait_or_at_once(kernels):
    source = torch.arange(1, 33, dtype=torch.uint8)
    src_bytes = torch.tensor([16, 5], dtype=torch.int32)
    out = torch.zeros(4, 64, dtype=torch.uint8)
    kernels.cp_async(source.data_ptr(), src_bytes.data_ptr(), out.data_ptr())
    first = list(range(1, 17))
    second = list(range(17, 22)) + [0] * 11  # 5 bytes copied, the rest of 16 zero-filled
    # Blocks 0 and 1: after cp_async_wait<1> only the first group has landed; the second reads the
    # fresh shared memory (the emulator's poison; on a GPU it may or may not have landed).
    # Blocks 2 and 3: every copy lands when issued (the other extreme the hardware allows).
    for block, pending in ((0, [0xFF] * 16), (1, [0xFF] * 16), (2, second), (3, second)):
        assert out[block, :32].tolist() == first + pending, block
        assert out[block, 32:].tolist() == first + second, block


def test_fresh_shared_memory_is_poisoned_in_every_block(kernels):
    out = torch.zeros(3, dtype=torch.int32)
    kernels.fresh_shared(3, out.data_ptr())
    assert _u32(out) == [POISON32] * 3  # block 0 zeroed it, block 1 still sees poison


def test_large_local_arrays_fit_on_the_fiber_stacks(kernels):
    threads = 1024
    out = torch.zeros(threads)
    kernels.local_array(threads, out.data_ptr())
    expected = [sum(float((i * 7 + t) % 13) for i in range(0, 16384, 3)) for t in (0, 1, 1023)]
    assert [out[0].item(), out[1].item(), out[1023].item()] == expected


# --- what the emulator reports -----------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, message",
    [
        (0, r"thread \(16, 0, 0\): divergent warp: lane 16 calls __syncwarp"),
        (1, r"__syncthreads reached after 1 threads of the block returned"),
        (2, r"deadlock: 1 of 32 threads wait at __syncthreads; warp 0: lanes 0xfffffffe wait"),
        (3, r"ldmatrix_x4: lane 0's row address 0x\w+ is not 16-byte aligned"),
        (4, r"ldmatrix_x4: lane 0's row address 0x\w+ is a thread's local variable"),
        (5, r"ldmatrix_x4: lane 0's row address \[0x\w+, 0x\w+\) is outside the dynamic shared"),
        (6, r"ldmatrix_x4 needs a whole warp; warp 1 of this block has lanes 0x0000ffff only"),
        (7, r"__shfl_sync called by lane 5, which is not in its mask 0x00000001"),
        (8, r"cp_async_16: global address .* is not 16-byte aligned"),
        (9, r"returned while lanes 0x0000ffff of its warp wait for it at __shfl_xor_sync"),
    ],
    ids=[
        "divergent",
        "barrier_after_return",
        "deadlock",
        "misaligned",
        "local",
        "out_of_bounds",
        "partial_warp",
        "not_in_mask",
        "cp_async_misaligned",
        "return_during_shuffle",
    ],
)
def test_misuse_is_a_launch_failure(kernels, kind, message):
    with pytest.raises(RuntimeError) as raised:
        kernels.misuse(kind)
    text = str(raised.value)
    assert text.startswith("unspecified launch failure (CUDA emulator: block (0, 0, 0)"), text
    assert re.search(message, text), text
    # The emulator recovers: the next launch runs normally.
    out = torch.zeros(3, dtype=torch.int32)
    kernels.fresh_shared(3, out.data_ptr())
    assert _u32(out) == [POISON32] * 3


def test_launch_configurations_the_gpu_refuses(kernels):
    kernels.config(1024, 48 << 10, 0)
    with pytest.raises(RuntimeError, match="invalid configuration argument"):
        kernels.config(1025, 0, 0)
    with pytest.raises(RuntimeError, match="49153 bytes of dynamic shared memory, over the 49152"):
        kernels.config(32, (48 << 10) + 1, 0)
    kernels.config(32, 232448, 232448)  # the H100's opt-in limit
    with pytest.raises(RuntimeError, match="invalid argument"):
        kernels.config(32, 0, 232449)


@pytest.mark.slow
def test_primitive_kernels_are_real_cuda(tmp_path):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    command = [
        nvcc, "-arch=sm_80", "-std=c++17", f"-I{CSRC}", f"-I{HERE}", "-c",
        str(HERE / "primitive_kernels.cu"), "-o", str(tmp_path / "primitive_kernels.o"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-6000:]


# --- the hook and csrc/'s LayerNorm under emulation ----------------------------------------------


def test_hook_routes_cuda_to_the_emulator_on_cpu_tensors_only(emulated_cuda):
    cpu = torch.device("cpu")
    assert _backend.cuda_extension() is emulated_cuda
    assert _backend.resolve("layer_norm", "cuda", cpu) == "cuda"
    assert _backend.resolve("layer_norm", "auto", cpu) == "torch"
    assert "CPU tensors" in _backend.unavailable_reason("cuda", torch.device("cuda"))
    assert (_backend.cuda_stream(cpu), _backend.device_index(cpu)) == (0, 0)
    with _backend.emulate_cuda_extension(None):
        assert _backend.unavailable_reason("cuda", cpu) != ""


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dim", [1, 7, 100, 384, 1000, 4097])
def test_layer_norm_kernels_match_the_reference(emulated_cuda, dim, dtype):
    # dim 4097: 512-thread backward blocks with 64 KiB of dynamic shared memory (the opt-in).
    weight, bias = [(True, True), (True, False), (False, True)][dim % 3]
    _check_against_reference(*_inputs((37, dim), dtype, weight, bias, "cpu"), "cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_norm_kernels_on_row_strides(emulated_cuda, dtype):
    # A row stride that keeps 16-byte alignment (vector path) and one that does not (scalar).
    for extra in (8, 3):
        x, w, b = _inputs((33, 256 + extra), dtype, device="cpu")
        _check_against_reference(x[:, :256], w[:256], b[:256], "cuda")


def test_layer_norm_kernels_for_the_widest_rows(emulated_cuda):
    # 1024-thread blocks, 128 KiB of shared memory in the backward.
    _check_against_reference(*_inputs((3, 16384), torch.float32, device="cpu"), "cuda")
