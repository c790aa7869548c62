"""Run by test_distributed.py under ``torchrun`` (not a test itself): ``lavis_dlip.train``
that dies, as a killed job does (``os._exit``, no clean-up), right after the mid-epoch
checkpoint of batch ``STOP_AT_BATCH`` of the first epoch is on disk on every rank."""

from __future__ import annotations

import os
import sys

import torch.distributed as dist


def main() -> int:
    from lavis_dlip.runners.runner_dlip import RunnerDlip
    from lavis_dlip.train import main as train

    stop_at, save = int(os.environ["STOP_AT_BATCH"]), RunnerDlip._save_checkpoint

    def save_then_die(self, cur_epoch, is_best=False, position=None):
        save(self, cur_epoch, is_best=is_best, position=position)
        if position is not None and position.batches == stop_at:
            dist.barrier()  # rank 0 has written it
            os._exit(17)

    RunnerDlip._save_checkpoint = save_then_die
    return train(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
