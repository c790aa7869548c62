"""The plugin's tasks, registered with LAVIS on import."""

from lavis_dlip.tasks.captioning import DlipCaptionTask
from lavis_dlip.tasks.distill import DistillPretrainTask, DistillRetrievalTask

__all__ = ["DistillPretrainTask", "DistillRetrievalTask", "DlipCaptionTask"]
