"""The ``runner_dlip`` runner, registered with LAVIS on import."""

from lavis_dlip.runners.runner_dlip import RunnerDlip

__all__ = ["RunnerDlip"]
