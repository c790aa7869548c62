"""DLIP model classes, registered with LAVIS on import."""

from lavis_dlip.models.dlip_caption import DlipCaption
from lavis_dlip.models.dlip_pretrain import DlipPretrain
from lavis_dlip.models.dlip_retrieval import DlipRetrieval
from lavis_dlip.models.dlip_vqa import DlipVQA

__all__ = ["DlipCaption", "DlipPretrain", "DlipRetrieval", "DlipVQA"]
