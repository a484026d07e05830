"""Model type "doe" in transformers' Auto classes without importing transformers with doe_ext.

``import doe_ext`` must stay fast (Stage 1 and the CLI never need transformers), yet
``AutoConfig.for_model("doe")`` and ``AutoModelForCausalLM.from_pretrained(<a DoE checkpoint>)`` must
work after it, as with a package that registers its models on import. So :func:`install` puts a
finder on ``sys.meta_path`` that waits for transformers' two Auto modules: once
``configuration_auto`` has run, ``DoEConfig`` is registered (unless ``modeling_auto`` is the one
importing it: then with the models); once ``modeling_auto`` has run,
``doe_ext.models.modeling_doe`` is imported and registers ``DoEModel`` / ``DoEForCausalLM`` (at its
end, since importing transformers' model stack may itself import ``modeling_auto``; when a model's module
is what imports ``modeling_auto``, once the transformers modules it needs have run to their end), and so is
``doe_ext.integrations.hf.doeify``, whose ``DoEWrapper`` is the model class of a saved drop-in (model
type ``"doe_ext_drop_in"``). Modules already imported are handled at once.
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys

CONFIG = "transformers.models.auto.configuration_auto"
MODELING = "transformers.models.auto.modeling_auto"
DROP_IN = "doe_ext.integrations.hf.doeify"


def _importing(name: str) -> bool:
    """Whether module ``name`` is being imported right now (its code may not have run to the end)."""
    module = sys.modules.get(name)
    return module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False)


def register_config(auto, deferred: bool = False) -> None:
    if _importing(MODELING) and not deferred:  # importing DoEConfig needs modeling_auto whole: after it
        return
    from doe_ext.models.configuration_doe import DoEConfig, DoEDropInConfig

    auto.AutoConfig.register("doe", DoEConfig, exist_ok=True)
    auto.AutoConfig.register("doe_ext_drop_in", DoEDropInConfig, exist_ok=True)


def register_models(auto=None) -> None:
    """Registers the models once both ``modeling_auto`` and ``modeling_doe`` have run (each side
    calls this when it arrives)."""
    auto, doe = auto or sys.modules.get(MODELING), sys.modules.get("doe_ext.models.modeling_doe")
    if auto is None or doe is None or not hasattr(auto, "AutoModelForCausalLM") or not hasattr(doe, "DoEForCausalLM"):
        return
    auto.AutoModel.register(doe.DoEConfig, doe.DoEModel, exist_ok=True)
    auto.AutoModelForCausalLM.register(doe.DoEConfig, doe.DoEForCausalLM, exist_ok=True)
    hf = importlib.import_module(DROP_IN)  # a saved drop-in (model type "doe_ext_drop_in") loads as DoEWrapper
    if hasattr(hf, "DoEWrapper"):  # else it is being imported: it calls this again at its end
        auto.AutoModelForCausalLM.register(hf.DoEWrapper.config_class, hf.DoEWrapper, exist_ok=True)


def _watched(name: str) -> bool:
    """transformers' modeling modules (``modeling_utils``, ``modeling_layers``, ``models.llama.modeling_llama``,
    ...): modeling_doe imports some of them, and cannot while one is half-way through its own import."""
    return name.startswith("transformers.") and name.rpartition(".")[2].startswith("modeling_")


def _in_flight(but: str) -> bool:
    return any(_watched(n) and n != but and _importing(n) for n in list(sys.modules))


_pending = []  # modeling_auto, while modeling_doe waits for a modeling module half-way through its import


def _import_models(auto) -> None:
    if "doe_ext.models.modeling_doe" in sys.modules:
        register_models(auto)
    else:
        importlib.import_module("doe_ext.models.modeling_doe")  # registers at its end


def _modeling_loaded(auto) -> None:
    register_config(sys.modules[CONFIG], deferred=True)  # modeling_auto imported configuration_auto first
    # A model's own module (``from transformers import LlamaForCausalLM`` as the first transformers import
    # after doe_ext's) imports modeling_layers, which imports modeling_auto half-way through: wait for them.
    if _in_flight(but=MODELING):
        _pending.append(auto)
    else:
        _import_models(auto)


def _modeling_module_loaded(module) -> None:
    """A modeling module has run to its end: the models, if they wait and no other is half-way."""
    if _pending and not _in_flight(but=module.__name__):
        _import_models(_pending.pop())


ACTIONS = {CONFIG: register_config, MODELING: _modeling_loaded}


def _action(name: str):
    return ACTIONS.get(name) or (_modeling_module_loaded if _watched(name) else None)


class _Loader(importlib.abc.Loader):
    """The module's own loader, then its action."""

    def __init__(self, loader, action):
        self._loader, self._action = loader, action

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._action(module)

    def __getattr__(self, name):  # get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        action = _action(fullname)
        if action is None:
            return None
        spec = next((s for f in sys.meta_path if f is not self and hasattr(f, "find_spec")
                     for s in [f.find_spec(fullname, path, target)] if s is not None), None)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, action)
        return spec


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    for name, action in ACTIONS.items():
        if name in sys.modules:
            action(sys.modules[name])
