"""Pure functions from recordings and adapters to tidy DataFrames (imports ``core`` and ``observe``)."""

from .causal import CausalConsistencyError, causal_consistency
from .diagnose import KINDS, Diagnosis, Finding, Thresholds, diagnose
from .experts import bank_cosines, bank_summary, distinct_experts, expert_similarity
from .intruders import intruder_dimensions
from .layout import lily_group_parameters, parameter_budget, sharing_layout, sharing_layout_from_config
from .merge import merge_at, merge_error
from .modes import mixture_modes
from .routing import (DISPATCH_COLUMNS, METRIC_COLUMNS, dispatch_metrics, expert_layer_profile, expert_load, router_metrics,
                      site_metrics, specialization, top_tokens)
from .spectra import delta_spectra, factor_singular_values, lora_equivalent_rank, rank_summary, spectrum_ranks
from .timeline import timeline_expert_similarity, timeline_expert_trajectories, timeline_metrics

__all__ = [
    "router_metrics", "specialization", "expert_layer_profile", "top_tokens", "site_metrics", "METRIC_COLUMNS",
    "expert_load", "dispatch_metrics", "DISPATCH_COLUMNS",
    "expert_similarity", "bank_summary", "bank_cosines", "distinct_experts",
    "delta_spectra", "rank_summary", "spectrum_ranks", "lora_equivalent_rank", "factor_singular_values",
    "intruder_dimensions", "merge_at", "merge_error", "mixture_modes",
    "diagnose", "Diagnosis", "Finding", "Thresholds", "KINDS", "causal_consistency", "CausalConsistencyError",
    "timeline_metrics", "timeline_expert_similarity", "timeline_expert_trajectories",
    "sharing_layout", "sharing_layout_from_config", "parameter_budget", "lily_group_parameters",
]
