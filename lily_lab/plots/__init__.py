"""Analysis results (DataFrames) → plotly ``go.Figure``s. Pure functions that never display anything.

``plots`` knows DataFrame columns only and imports nothing else from lily_lab but its exceptions
(``lily_lab.core.errors``; docs/architecture.md): give each function the frame named in its doc string. A wrong
frame raises :class:`~lily_lab.InputError` (a ``ValueError``) naming the missing columns or the
unknown site, a value that is no DataFrame :class:`~lily_lab.LilyLabTypeError` (a ``TypeError``).
Every figure uses the ``"lily_lab"`` template, colours expert ``e`` with ``expert_color(e)`` and
escapes every text that comes from the data.
"""

from ._common import bank_label, escape, message_figure, site_label
from .findings import (FINDING_CSS, KIND_TITLES, count_label, evidence_html, finding_html, number_label,
                       place_label)
from .experts import (plot_diagnosis, plot_expert_similarity, plot_expert_trajectories, plot_rank_by_layer,
                      plot_spectra)
from .routing import (plot_expert_load, plot_expert_profile, plot_label_usage, plot_metric_timeline, plot_mixture_modes, plot_usage_bars,
                      plot_usage_heatmap)
from .teaching import plot_parameter_budget, plot_sharing_diagram
from .theme import EXPERT_COLORS, SEVERITY_COLORS, TEMPLATE, expert_color, severity_color
from .tokens import plot_token_probs, plot_token_routes, plot_token_text, plot_top_tokens, prediction_for

__all__ = [
    # routing views
    "plot_usage_heatmap", "plot_usage_bars", "plot_label_usage", "plot_expert_profile", "plot_metric_timeline",
    "plot_mixture_modes",
    # the dispatch of mixture-of-experts layers (tokens actually sent to each expert)
    "plot_expert_load",
    # token views
    "plot_token_probs", "plot_top_tokens", "plot_token_text", "plot_token_routes", "prediction_for",
    # adapter views
    "plot_spectra", "plot_rank_by_layer", "plot_expert_similarity", "plot_diagnosis", "plot_expert_trajectories",
    # teaching views
    "plot_sharing_diagram", "plot_parameter_budget",
    # theme
    "TEMPLATE", "EXPERT_COLORS", "SEVERITY_COLORS", "expert_color", "severity_color", "escape", "message_figure",
    # names: one display name per site and bank, everywhere
    "site_label", "bank_label",
    # findings: the diagnosis as HTML cards, shared by the report and the widgets
    "place_label", "count_label", "number_label", "evidence_html", "finding_html", "FINDING_CSS", "KIND_TITLES",
]
