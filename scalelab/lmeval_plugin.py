"""Makes lm-eval's own `lm_eval` command know the model type `scalelab`.

lm-eval (0.4.x) has no plugin lookup: `--model NAME` is looked up in a registry that only its
own package `lm_eval.models` fills (lm-eval issues 1621 and 3282 ask for one). So installing
scalelab puts one file, `scalelab_lmeval.pth`, in site-packages; Python runs its single line,
`import scalelab.lmeval_plugin`, at start-up. This module imports nothing heavy: it waits until
`lm_eval.models` is imported (by lm-eval's command line or anyone) and then adds `scalelab` to
lm-eval's registry as a lazy entry, so scalelab.lmeval (and torch) load only when a run asks
for `--model scalelab`. Every other program pays one string comparison per import.
"""

from __future__ import annotations

import sys

NAME, TARGET = "scalelab", "scalelab.lmeval:ScalelabEvalLM"


def register() -> None:
    """Add the lazy `scalelab` entry to lm-eval's model registry (once)."""
    from lm_eval.api.registry import model_registry
    if NAME not in model_registry:
        model_registry.register(NAME, target=TARGET)


class _RegisterAfter:
    """The real loader of lm_eval.models, which registers `scalelab` once that has run."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        register()

    def __getattr__(self, name: str):  # create_module, get_code, is_package, readers, ...
        return getattr(self._loader, name)


class _Watch:
    """A meta-path finder that answers only for lm_eval.models, with the spec the other
    finders give, its loader wrapped."""

    def find_spec(self, name: str, path=None, target=None):
        if name != "lm_eval.models":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisterAfter(spec.loader)
                return spec
        return None


def install() -> None:
    if "lm_eval.models" in sys.modules:
        register()
    elif not any(isinstance(f, _Watch) for f in sys.meta_path):
        sys.meta_path.insert(0, _Watch())


install()
