"""The plugin's tasks, registered with LAVIS on import."""

from lavis_dlip.tasks.captioning import DlipCaptionTask

__all__ = ["DlipCaptionTask"]
