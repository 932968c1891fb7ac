"""lily_lab: Lily adapters, and tools to see what their routers and experts learned.

The public API (docs/architecture.md) is importable from here; see ``__all__``.
"""

from .analysis import (
    Diagnosis,
    bank_summary,
    causal_consistency,
    delta_spectra,
    diagnose,
    expert_layer_profile,
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
    save_adapter,
    set_lily_options,
)
from .observe import Recorder, Routing, RoutingError, Timeline, record_dataset, record_routing
from .report import report  # lily_lab.report is the function; `from lily_lab.report import …` reaches the module

__version__ = "0.1.0"

__all__ = [
    # core
    "LilyConfig", "LilyLayer", "Site", "add_lily", "remove_lily", "adapter_sites", "adapter_summary",
    "count_parameters", "save_adapter", "load_adapter", "lily_aux_loss", "set_lily_options",
    # observe
    "record_routing", "record_dataset", "Recorder", "Routing", "Timeline", "RoutingCallback",
    # analysis
    "router_metrics", "specialization", "expert_layer_profile", "top_tokens", "expert_similarity",
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


def __getattr__(name: str):
    if name == "RoutingCallback":  # subclasses transformers' TrainerCallback: built on first use
        from .observe import timeline

        return timeline.RoutingCallback
    raise AttributeError(f"module 'lily_lab' has no attribute {name!r}")
