"""A save killed midway (tests/test_fsdp_checkpoint.py): ``python fsdp_checkpoint_worker_kill.py
MODE DIRECTORY`` trains the worker's model in one process, saves step 1, trains step 2 and
SIGKILLs itself while saving step 2:

- ``during-write``: in DCP's writer, after the data files and before the metadata;
- ``before-pointer``: after the step directory was renamed into place, before ``latest`` moved.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from fsdp_checkpoint_worker import build, run
from torch.distributed.checkpoint import FileSystemWriter

from dinov2_fast.fsdp import checkpoint


def _die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    mode, directory = sys.argv[1], Path(sys.argv[2])
    named, optimizer, scheduler = build(0, shard=False)
    run(named, optimizer, scheduler, 0, 1)
    checkpoint.save_checkpoint(directory, 1, model=named, optimizer=optimizer, scheduler=scheduler)
    run(named, optimizer, scheduler, 1, 2)
    if mode == "during-write":
        FileSystemWriter.finish = _die
    elif mode == "before-pointer":
        checkpoint._write_pointer = _die
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    checkpoint.save_checkpoint(directory, 2, model=named, optimizer=optimizer, scheduler=scheduler)
    raise SystemExit("the save was not killed")


if __name__ == "__main__":
    main()
