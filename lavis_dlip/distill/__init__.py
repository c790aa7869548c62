"""Distillation: frozen teacher, hook capture, registered loss terms."""

from lavis_dlip.distill.distiller import ATTRIBUTE, Distiller
from lavis_dlip.distill.losses import TERMS, build_terms, register_term, validate_terms
from lavis_dlip.distill.teacher import FrozenTeacher, load_teacher

__all__ = ["ATTRIBUTE", "Distiller", "FrozenTeacher", "TERMS", "build_terms", "load_teacher", "register_term",
           "validate_terms"]
