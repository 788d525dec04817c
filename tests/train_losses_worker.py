"""Distributed worker for tests/test_train_losses.py: the losses' cross-process reductions.

``torchrun --nproc_per_node=2 train_losses_worker.py OUT`` gives each rank its share of the rows
of :func:`worker_data` (the same on every rank and in the test) and writes, from every rank, to
``OUT.rank<r>``:

- ``dino_sk`` / ``dino_sk_large``: DINOLoss.sinkhorn_knopp_teacher on this rank's half of the rows
  (the second with logits offset by 100, whose exp overflows);
- ``dino_probs`` / ``dino_center``: three steps of centering (softmax_center_teacher,
  update_center) on halves, then the targets of a last batch and the center;
- ``dino_center_unequal``: one update with 3 rows on rank 0 and 6 on rank 1;
- ``ibot_sk``: iBOTPatchLoss.sinkhorn_knopp_teacher with 7 and 12 masked tokens and each rank's
  count as the tensor (``ibot_count_after``: that tensor after the call);
- ``ibot_probs`` / ``ibot_center``: two steps of iBOT centering on equal halves ``[1, M/2, K]``;
- ``ibot_center_unequal``: one update with 7 and 12 tokens.

The test computes the same on one process with all the rows.
"""

from __future__ import annotations

import sys

import torch

K = 37  # prototypes
ROWS = 10  # DINO rows in all (5 per rank)
TEMP = 0.05
IBOT_SPLIT = (7, 12)  # masked tokens per rank for the unequal cases
IBOT_ROWS = 16  # masked tokens in all for the equal halves


def worker_data() -> dict[str, torch.Tensor]:
    """Every rank's and the test's inputs (all the rows), from a fixed seed."""
    g = torch.Generator().manual_seed(1234)
    return {
        "dino_sk": torch.randn(ROWS, K, generator=g),
        "dino_steps": torch.randn(4, ROWS, K, generator=g),
        "dino_unequal": torch.randn(9, K, generator=g),
        "ibot_sk": torch.randn(sum(IBOT_SPLIT), K, generator=g),
        "ibot_steps": torch.randn(3, IBOT_ROWS, K, generator=g),
        "ibot_unequal": torch.randn(sum(IBOT_SPLIT), K, generator=g),
    }


def _half(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return x.chunk(world)[rank]


def main(out: str) -> None:
    from distributed import finish_worker, init_worker, save_result

    from dinov2_fast.train.losses import DINOLoss, iBOTPatchLoss

    rank, world = init_worker()
    assert world == 2, "the worker splits the rows in two"
    data = worker_data()
    result = {}

    dino = DINOLoss(K)
    result["dino_sk"] = dino.sinkhorn_knopp_teacher(_half(data["dino_sk"], rank, world), TEMP)
    large = _half(data["dino_sk"] + 100, rank, world)
    result["dino_sk_large"] = dino.sinkhorn_knopp_teacher(large, TEMP)

    probs = None
    for step in data["dino_steps"]:
        rows = _half(step, rank, world)
        probs = dino.softmax_center_teacher(rows, TEMP)
        dino.update_center(rows)
    result["dino_probs"] = probs
    result["dino_center"] = dino.state_dict()["center"]

    unequal = DINOLoss(K)
    rows = data["dino_unequal"][:3] if rank == 0 else data["dino_unequal"][3:]
    unequal.update_center(rows)
    result["dino_center_unequal"] = unequal.state_dict()["center"]

    ibot = iBOTPatchLoss(K)
    start, stop = (0, IBOT_SPLIT[0]) if rank == 0 else (IBOT_SPLIT[0], sum(IBOT_SPLIT))
    count = torch.tensor([stop - start])
    result["ibot_sk"] = ibot.sinkhorn_knopp_teacher(data["ibot_sk"][start:stop], TEMP, count)
    result["ibot_count_after"] = count

    for step in data["ibot_steps"]:
        tokens = _half(step, rank, world)[None]
        probs = ibot.softmax_center_teacher(tokens, TEMP)
        ibot.update_center(tokens)
    result["ibot_probs"] = probs
    result["ibot_center"] = ibot.state_dict()["center"]

    unequal = iBOTPatchLoss(K)
    unequal.update_center(data["ibot_unequal"][start:stop])
    result["ibot_center_unequal"] = unequal.state_dict()["center"]

    save_result(out, result, all_ranks=True)
    finish_worker()


if __name__ == "__main__":
    main(sys.argv[1])
