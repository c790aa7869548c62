"""Local data builders (registered with LAVIS on import) and the embedded demo data."""

from lavis_dlip.datasets import builders
from lavis_dlip.datasets.demo_data import register_resolver

register_resolver()

__all__ = ["builders"]
