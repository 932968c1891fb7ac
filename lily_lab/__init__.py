"""lily_lab: Lily adapters, and tools to see what their routers and experts learned.

The public API (docs/architecture.md) is importable from here; see ``__all__``.
"""

import sys as _sys
from importlib import abc as _abc, import_module as _import_module, util as _util

from .analysis import (
    Diagnosis,
    bank_summary,
    causal_consistency,
    delta_spectra,
    diagnose,
    expert_layer_profile,
    expert_load,
    expert_similarity,
    intruder_dimensions,
    lora_equivalent_rank,
    merge_at,
    merge_error,
    parameter_budget,
    rank_summary,
    router_metrics,
    sharing_layout,
    sharing_layout_from_config,
    specialization,
    timeline_expert_similarity,
    timeline_expert_trajectories,
    timeline_metrics,
    top_tokens,
)
from .core import (
    CheckpointError,
    InputError,
    LilyConfig,
    LilyConfigError,
    LilyLabError,
    LilyLabFileError,
    LilyLabFileNotFoundError,
    LilyLabTypeError,
    LilyLayer,
    MixtureError,
    NonFiniteWeightsError,
    Site,
    TargetError,
    TargetTypeError,
    adapter_sites,
    adapter_summary,
    add_lily,
    lily_aux_loss,
    count_parameters,
    load_adapter,
    remove_lily,
    RouterSite,
    router_sites,
    save_adapter,
    set_lily_options,
)
from .monitor import EarlyWarning, RoutingMonitor
from .observe import Recorder, Routing, RoutingError, Timeline, record_dataset, record_routing
from .app.report import report  # lily_lab.report is the function; `from lily_lab.report import …` reaches the module

__version__ = "0.1.0"

__all__ = [
    # core
    "LilyConfig", "LilyLayer", "Site", "add_lily", "remove_lily", "adapter_sites", "adapter_summary",
    "count_parameters", "RouterSite", "router_sites", "save_adapter", "load_adapter", "lily_aux_loss", "set_lily_options",
    # observe
    "record_routing", "record_dataset", "Recorder", "Routing", "Timeline",
    # monitor
    "RoutingCallback", "RoutingMonitor", "EarlyWarning",
    # analysis
    "router_metrics", "expert_load", "specialization", "expert_layer_profile", "top_tokens", "expert_similarity",
    "timeline_metrics", "timeline_expert_similarity", "timeline_expert_trajectories", "bank_summary",
    "delta_spectra", "rank_summary", "lora_equivalent_rank", "intruder_dimensions", "merge_at", "merge_error",
    "diagnose", "Diagnosis", "causal_consistency",
    "sharing_layout", "sharing_layout_from_config", "parameter_budget",
    # report
    "report",
    # errors
    "LilyLabError", "LilyConfigError", "TargetError", "TargetTypeError", "CheckpointError", "RoutingError",
    "NonFiniteWeightsError", "MixtureError", "InputError", "LilyLabTypeError", "LilyLabFileError",
    "LilyLabFileNotFoundError",
]


# The application modules live in lily_lab.app; their older names lily_lab.<name> are the same
# module objects. `lily_lab.demo` (attribute) is answered by __getattr__ below; `import lily_lab.demo`
# and `from lily_lab.demo import x` by the finder, which hands the import system lily_lab.app.demo
# itself (never a second copy). lily_lab.report is the report function, so its module is entered
# in sys.modules here, and the finder never reaches it (an import through the finder would make
# the module the attribute).
_MOVED = ("cli", "commands", "demo", "llm")
_sys.modules.setdefault(f"{__name__}.report", _sys.modules[f"{__name__}.app.report"])


class _MovedModules(_abc.MetaPathFinder, _abc.Loader):
    """``lily_lab.<name>`` for each name of ``_MOVED``: the module ``lily_lab.app.<name>``."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != __name__ or name not in _MOVED:
            return None
        return _util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = _import_module(f"{__name__}.app.{spec.name.rpartition('.')[2]}")
        spec.loader_state = module.__spec__  # the import system sets module.__spec__ = spec next; undone below
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state

    def get_code(self, fullname):  # `python -m lily_lab.cli` runs lily_lab.app.cli as __main__
        moved = f"{__name__}.app.{fullname.rpartition('.')[2]}"
        return compile(f"import runpy\nrunpy.run_module({moved!r}, run_name='__main__', alter_sys=True)\n",
                       f"<{fullname}: {moved}>", "exec")


if not any(type(f).__name__ == _MovedModules.__name__ for f in _sys.meta_path):  # once, even on a reload
    _sys.meta_path.append(_MovedModules())


def __getattr__(name: str):
    if name == "RoutingCallback":  # subclasses transformers' TrainerCallback: built on first use
        from .monitor.callback import routing_callback_class

        return routing_callback_class()
    if name in _MOVED:  # lily_lab.demo: imported on first use, as before the move
        return _import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'lily_lab' has no attribute {name!r}")
