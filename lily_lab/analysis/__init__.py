"""Pure functions from recordings and adapters to tidy DataFrames (imports ``core`` and ``observe``)."""

from .experts import bank_cosines, expert_similarity
from .routing import METRIC_COLUMNS, expert_layer_profile, router_metrics, site_metrics, specialization, top_tokens
from .timeline import timeline_expert_similarity, timeline_metrics

__all__ = ["router_metrics", "specialization", "expert_layer_profile", "top_tokens", "site_metrics",
           "METRIC_COLUMNS", "expert_similarity", "bank_cosines", "timeline_metrics", "timeline_expert_similarity"]
