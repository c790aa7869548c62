"""Load the lavis-dlip plugin the moment a program imports LAVIS.

``pip install`` puts ``lavis_dlip_autoload.pth`` into site-packages; Python runs it at
start-up, and it installs one import hook (``LavisFinder``) and nothing else, so a
program that never imports LAVIS pays for this small module only. When ``lavis`` is
first imported (LAVIS's own ``train.py`` and ``evaluate.py``, a notebook, any script),
the hook imports ``lavis_dlip`` instead, which applies its compatibility fixes before
LAVIS loads (``lavis_dlip/compat.py``) and registers the ``dlip_*`` models, tasks,
builders and ``runner_dlip`` after; the import then returns that same ``lavis`` module.

``LAVIS_DLIP_AUTOLOAD=0`` switches it off: ``import lavis`` is LAVIS's alone.
"""

from __future__ import annotations

import os
import sys

ENV = "LAVIS_DLIP_AUTOLOAD"
OFF = ("0", "false", "no", "off")


class _Loaded:
    """A loader for a module that is already in ``sys.modules``: the import machinery's
    last step, after the hook has imported it, without running its code twice."""

    def __init__(self, spec):
        self.spec = spec  # LAVIS's own spec, given back to the module once loaded

    def create_module(self, spec):
        return sys.modules[spec.name]

    def exec_module(self, module) -> None:
        module.__spec__ = self.spec


class LavisFinder:
    """``sys.meta_path`` entry that runs once, on the first ``import lavis``."""

    def find_spec(self, name, path=None, target=None):
        if name != "lavis":
            return None
        uninstall()
        if "lavis_dlip" in sys.modules:  # the plugin is importing LAVIS itself: let it
            return None
        try:
            import lavis_dlip  # noqa: F401  (fixes, then LAVIS, then registration)
        except Exception as err:  # never make ``import lavis`` fail where LAVIS alone would work
            print(f"lavis-dlip: the plugin did not load ({type(err).__name__}: {err}); "
                  f"LAVIS runs without it (set {ENV}=0 to skip it)", file=sys.stderr)
        module = sys.modules.get("lavis")
        if module is None:
            return None
        import importlib.machinery

        real = module.__spec__
        spec = importlib.machinery.ModuleSpec("lavis", _Loaded(real), origin=real.origin, is_package=True)
        spec.submodule_search_locations = real.submodule_search_locations
        module.__spec__ = spec  # what the import machinery reads back for a module already loaded
        return spec


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in OFF


def install() -> bool:
    """Put the hook first on ``sys.meta_path`` (unless switched off or LAVIS is loaded)."""
    if not enabled() or "lavis" in sys.modules or any(isinstance(f, LavisFinder) for f in sys.meta_path):
        return False
    sys.meta_path.insert(0, LavisFinder())
    return True


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, LavisFinder)]


install()
