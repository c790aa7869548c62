"""lavis-dlip: DLIP distillation of BLIP models as a Salesforce LAVIS plugin.

``import lavis_dlip`` applies the LAVIS 1.0.2 compatibility fixes (lavis_dlip.compat),
then registers the plugin's models (``dlip_*``), tasks, dataset builders and the
``runner_dlip`` runner with LAVIS's registry, and lists the models in
``lavis.models.model_zoo``. Importing it again is a no-op.
"""

from lavis_dlip import compat

compat.apply()

# What LAVIS's train.py imports for registration: LR schedulers and runners.
import lavis.common.optims  # noqa: E402,F401
import lavis.runners  # noqa: E402,F401

from lavis_dlip import datasets, models, runners, tasks  # noqa: E402  (registration)
from lavis_dlip.registration import update_model_zoo  # noqa: E402

update_model_zoo()

__version__ = "0.1.0"
__all__ = ["compat", "datasets", "models", "runners", "tasks", "__version__"]
