"""REFILLED: generalized knowledge distillation via relationship matching."""

__version__ = "0.1.0"



def lazy_names(package: str, where: dict[str, str]):
    """`__getattr__` and `__dir__` (PEP 562) for a package whose names are loaded on first use
    from the submodules `where` names, so that importing one torch-free submodule does not
    import torch through its package."""
    import importlib
    import sys

    def __getattr__(name):
        if name in where:
            value = getattr(importlib.import_module(where[name]), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__

# Modules that moved when the package was laid out in layers (docs/design.md). Importing an
# old path gives the module itself (patching it patches the one module), with a warning that
# names the new place.
_MOVED = {
    "refilled.augment": "refilled.data.augment",
    "refilled.archs": "refilled.models.archs",
    "refilled.step": "refilled.training.step",
    "refilled.train": "refilled.training.loop",
    "refilled.runs": "refilled.training.run",
    "refilled.checkpoints": "refilled.training.checkpoints",
    "refilled.finished": "refilled.training.finished",
    "refilled.config": "refilled.experiments.profile",
    "refilled.grid": "refilled.experiments.grid",
    "refilled.tables": "refilled.report.tables",
    "refilled.figures": "refilled.report.figures",
    "refilled.claims": "refilled.report.claims",
    "refilled.gain": "refilled.report.gain",
    "refilled.reproduction": "refilled.report.reproduction",
    "refilled.supplement": "refilled.report.supplement",
    "refilled.results": "refilled.report.results",
    "refilled.bench": "refilled.tools.bench",
    "refilled.doctor": "refilled.tools.doctor",
    "refilled.pin": "refilled.tools.pin",
    "refilled.plan": "refilled.tools.plan",
    "refilled.flops": "refilled.tools.flops",
    "refilled.phases": "refilled.training.phases",
    "refilled.forkserver": "refilled.tools.forkserver",
}


class _MovedModules:
    """Import hook for the old paths in `_MOVED`; imports nothing until one is asked for."""

    def find_spec(self, name, path=None, target=None):
        if name not in _MOVED:
            return None
        import importlib.util

        return importlib.util.spec_from_loader(name, self, origin=importlib.util.find_spec(_MOVED[name]).origin)

    def get_code(self, name):
        """`python -m OLD` runs the moved module (runpy asks for its code)."""
        import importlib.util

        return importlib.util.find_spec(_MOVED[name]).loader.get_code(_MOVED[name])

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        import importlib
        import sys
        import warnings

        new = _MOVED[module.__name__]
        warnings.warn(f"{module.__name__} moved to {new}; import it from there", DeprecationWarning, stacklevel=2)
        # the import system hands out what sys.modules holds under the old name after this call
        sys.modules[module.__name__] = importlib.import_module(new)


def _install_moved_modules_hook():
    import sys

    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModules())


_install_moved_modules_hook()
