"""Keeps LAVIS's ``model_zoo`` in step with the registry.

``lavis.models.model_zoo`` is a snapshot taken when LAVIS is imported
(models/__init__.py:260), so models registered later are missing from it.
"""

from __future__ import annotations


def update_model_zoo() -> dict[str, list[str]]:
    """Add every registered model that the snapshot lacks; returns the zoo dict."""
    from lavis.common.registry import registry
    from lavis.models import model_zoo

    for name, cls in registry.mapping["model_name_mapping"].items():
        model_zoo.model_zoo[name] = list(cls.PRETRAINED_MODEL_CONFIG_DICT)
    return model_zoo.model_zoo
