"""The plugin's tasks, registered with LAVIS on import."""

from lavis_dlip.tasks.captioning import DlipCaptionTask
from lavis_dlip.tasks.distill import (
    DistillCaptionTask,
    DistillPretrainTask,
    DistillRetrievalTask,
    DistillVQATask,
)

__all__ = ["DistillCaptionTask", "DistillPretrainTask", "DistillRetrievalTask", "DistillVQATask", "DlipCaptionTask"]
