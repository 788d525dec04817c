"""Distributed worker for tests/test_prototype_cross_entropy.py: Sinkhorn-Knopp across processes.

``torchrun --nproc_per_node=2 prototype_cross_entropy_worker.py OUT`` gives each rank its rows of
:func:`worker_data` (the same on every rank and in the test) for each split of :data:`SPLITS`
(unequal on purpose, one with no rows at all on rank 0), weighs every row ``1 / R_total`` (so the
ranks' losses and weight gradients sum to the one-process result on all the rows), runs
``prototype_cross_entropy`` with ``sinkhorn_iters=ITERS`` on both backends, and writes from every
rank to ``OUT.rank<r>``, per split and backend: the loss, the gradient of its own rows of
``student_feats``, the gradient of ``student_weight`` and the mean of its teacher logits.
"""

from __future__ import annotations

import sys

import torch

ROWS, K, F = 19, 150, 24
SPLITS = ((7, 12), (0, 19))  # rows on rank 0 and rank 1
ITERS = 3
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.05
BACKENDS = ("torch", "triton")


def worker_data() -> dict[str, torch.Tensor]:
    """Every rank's and the test's inputs (all the rows), from a fixed seed: unit rows and
    prototypes, as DINOv2's normalised bottleneck and weight-normed last layer give."""
    g = torch.Generator().manual_seed(4321)

    def unit(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)

    return {
        "student_feats": unit(ROWS, F),
        "student_weight": unit(K, F),
        "teacher_feats": unit(ROWS, F),
        "teacher_weight": unit(K, F),
    }


def main(out: str) -> None:
    from distributed import finish_worker, init_worker, save_result

    from dinov2_fast.ops import prototype_cross_entropy

    rank, world = init_worker()
    assert world == 2, "the worker splits the rows in two"
    data = worker_data()
    result = {}
    for split in SPLITS:
        start = sum(split[:rank])
        stop = start + split[rank]
        for backend in BACKENDS:
            xs = data["student_feats"][start:stop].clone().requires_grad_()
            ws = data["student_weight"].clone().requires_grad_()
            loss, mean = prototype_cross_entropy(
                xs,
                ws,
                data["teacher_feats"][start:stop],
                data["teacher_weight"],
                student_temp=STUDENT_TEMP,
                teacher_temp=TEACHER_TEMP,
                sinkhorn_iters=ITERS,
                row_weight=torch.full((stop - start,), 1.0 / ROWS),
                backend=backend,
            )
            loss.backward()
            key = f"{split[0]}_{split[1]}_{backend}"
            result[key] = {"loss": loss, "d_feats": xs.grad, "d_weight": ws.grad, "mean": mean}
    save_result(out, result, all_ranks=True)
    finish_worker()


if __name__ == "__main__":
    main(sys.argv[1])
