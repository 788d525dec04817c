"""``BlockDiagonalMask``: packs sequences into one and says where each begins, for varlen attention.

Compatible with xFormers' ``fmha.BlockDiagonalMask`` as DINOv2 uses it: ``from_seqlens``,
``from_tensor_list`` (returns ``(mask, packed)`` and sets ``_batch_sizes``), ``split`` and the
``_batch_sizes`` attribute. The sequence lengths are Python ints, so building ``cu_seqlens`` and
checking it never waits for the GPU; the int32 tensor is cached per device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["BlockDiagonalMask"]


class BlockDiagonalMask:
    """Tokens attend only to tokens of their own sequence in a packed ``[1, T, ...]`` tensor.

    Attributes:
        seqlens: the length of each packed sequence, in order.
        max_seqlen: the longest.
        _batch_sizes: set by ``from_tensor_list`` (or by hand, as DINOv2 does): how many
            consecutive sequences of equal length came from each input tensor; ``split`` uses it.
    """

    def __init__(self, seqlens: Sequence[int]) -> None:
        seqlens = tuple(seqlens)
        if not seqlens:
            raise ValueError("seqlens must name at least one sequence, got none")
        for length in seqlens:
            if isinstance(length, bool) or not isinstance(length, int) or length < 1:
                raise ValueError(f"seqlens must be positive ints, got {length!r} in {seqlens[:8]}")
        self.seqlens = seqlens
        self.max_seqlen = max(seqlens)
        self.total = sum(seqlens)
        self._batch_sizes: Sequence[int] | None = None
        self._cu_seqlens: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_seqlens(
        cls, q_seqlen: Sequence[int], kv_seqlen: Sequence[int] | None = None
    ) -> BlockDiagonalMask:
        """The mask for sequences of lengths ``q_seqlen`` (self-attention: ``kv_seqlen`` must be
        None or the same lengths)."""
        if kv_seqlen is not None and tuple(kv_seqlen) != tuple(q_seqlen):
            raise ValueError("kv_seqlen must equal q_seqlen: only self-attention is supported")
        return cls(q_seqlen)

    @classmethod
    def from_tensor_list(
        cls, tensors: Sequence[torch.Tensor]
    ) -> tuple[BlockDiagonalMask, torch.Tensor]:
        """Packs ``[B_i, N_i, ...]`` tensors into one ``[1, sum B_i·N_i, ...]`` tensor and returns
        ``(mask, packed)``; ``mask._batch_sizes`` is ``[B_i]`` so ``mask.split`` undoes it."""
        if not tensors:
            raise ValueError("tensors must hold at least one tensor, got none")
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor) or t.dim() < 2:
                raise ValueError(f"tensors[{i}] must be a [B, N, ...] tensor, got {_describe(t)}")
            if t.shape[2:] != tensors[0].shape[2:]:
                raise ValueError(
                    f"tensors[{i}] has trailing shape {list(t.shape[2:])}, "
                    f"tensors[0] has {list(tensors[0].shape[2:])}"
                )
        seqlens = [t.shape[1] for t in tensors for _ in range(t.shape[0])]
        mask = cls(seqlens)
        mask._batch_sizes = [t.shape[0] for t in tensors]
        packed = torch.cat([t.reshape(1, -1, *t.shape[2:]) for t in tensors], dim=1)
        return mask, packed

    def split(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """``[1, T, ...]`` (or ``[T, ...]``) back into ``[B_i, N_i, ...]`` tensors by
        ``_batch_sizes``; one ``[1, N, ...]`` tensor per sequence when it is not set."""
        packed = tensor[0] if tensor.dim() >= 2 and tensor.shape[0] == 1 else tensor
        if packed.shape[0] != self.total:
            raise ValueError(
                f"tensor must hold the {self.total} packed tokens of this mask in dimension "
                f"{1 if packed is not tensor else 0}, got shape {list(tensor.shape)}"
            )
        batch_sizes = self._batch_sizes or [1] * len(self.seqlens)
        if sum(batch_sizes) != len(self.seqlens):
            raise ValueError(
                f"_batch_sizes {list(batch_sizes)} must add up to the {len(self.seqlens)} sequences"
            )
        pieces, start, seq = [], 0, 0
        for batch in batch_sizes:
            lengths = set(self.seqlens[seq : seq + batch])
            if len(lengths) != 1:
                raise ValueError(
                    f"sequences {seq}..{seq + batch - 1} differ in length ({sorted(lengths)}): a "
                    f"group of _batch_sizes must share one length"
                )
            length = lengths.pop()
            end = start + batch * length
            pieces.append(packed[start:end].reshape(batch, length, *packed.shape[1:]))
            start, seq = end, seq + batch
        return pieces

    def cu_seqlens(self, device: torch.device | str) -> torch.Tensor:
        """The int32 ``[S + 1]`` offsets of the sequences, on ``device`` (cached)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._cu_seqlens:
            offsets = [0]
            for length in self.seqlens:
                offsets.append(offsets[-1] + length)
            self._cu_seqlens[device] = torch.tensor(offsets, dtype=torch.int32, device=device)
        return self._cu_seqlens[device]

    def materialize(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """The dense ``[T, T]`` additive mask: 0 inside a sequence's block, -inf elsewhere."""
        ids = torch.repeat_interleave(
            torch.arange(len(self.seqlens), device=device),
            torch.tensor(self.seqlens, device=device),
        )
        bias = torch.full((self.total, self.total), float("-inf"), dtype=dtype, device=device)
        return bias.masked_fill(ids[:, None] == ids[None, :], 0.0)

    def __repr__(self) -> str:
        shown = ", ".join(map(str, self.seqlens[:6])) + (", ..." if len(self.seqlens) > 6 else "")
        return f"BlockDiagonalMask(seqlens=[{shown}] ({len(self.seqlens)} sequences))"


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    return type(value).__name__
