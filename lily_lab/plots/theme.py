"""One look for every lily_lab figure: a registered plotly template, a colour per expert, a colour
per severity and the usage colour scale.

The template is registered as ``plotly.io.templates["lily_lab"]`` but never made the default:
importing lily_lab does not restyle a user's other figures.
"""

from __future__ import annotations

import plotly.graph_objects as go
import plotly.io as pio
from plotly.colors import qualitative

from ..core.palette import SEVERITY_COLORS  # diagnosis severities, shared with analysis and the report

TEMPLATE = "lily_lab"

#: Expert ``e`` is drawn in ``EXPERT_COLORS[e]`` in every figure (Tableau 10, then Alphabet).
EXPERT_COLORS: list[str] = [
    "#4E79A7", "#F28E2B", "#59A14F", "#B07AA1", "#76B7B2", "#EDC948", "#FF9DA7", "#9C755F", "#BAB0AC", "#E15759",
] + list(qualitative.Alphabet)


NEUTRAL = "#7f7f7f"  # structure that is not an expert: sites, edges, bounds
ACCENT = "#2a3f5f"  # shared A projectors, reference lines


def expert_color(e: int) -> str:
    """The colour of expert ``e`` (0-based); cycles after ``len(EXPERT_COLORS)`` experts."""
    try:
        e = int(e)
    except (TypeError, ValueError):
        from ..core.errors import InputError

        raise InputError(f"expert_color: e must be an expert index (an integer ≥ 0), got {e!r}") from None
    return EXPERT_COLORS[e % len(EXPERT_COLORS)]


def severity_color(severity: str) -> str:
    """The colour of a diagnosis severity (``"warning"``, ``"critical"``, ``"ok"``); grey otherwise."""
    return SEVERITY_COLORS.get(str(severity), NEUTRAL)


def usage_colorscale(num_B: int) -> list[list]:
    """Diverging scale on [0, 1] that is white at the fair share ``1/E``: blue below (an expert
    used less than its share), red above (used more). One colour per cell tells balance at a glance."""
    fair = 1.0 / max(int(num_B), 1)
    if fair >= 1.0:
        return [[0.0, "#2166ac"], [1.0, "#f7f7f7"]]
    return [[0.0, "#2166ac"], [fair / 2, "#92c5de"], [fair, "#f7f7f7"], [(1 + fair) / 2, "#f4a582"],
            [1.0, "#b2182b"]]


def _template() -> go.layout.Template:
    """A small template: plotly_white's look in a dozen layout properties. (Deriving from the full
    ``plotly_white`` made every figure copy and validate its hundreds of trace defaults — about
    50 ms per figure, most of a widget update.)"""
    axis = dict(gridcolor="#EBF0F8", linecolor="#EBF0F8", zerolinecolor="#EBF0F8", zerolinewidth=2,
                ticks="", automargin=True, title=dict(standoff=12))
    return go.layout.Template(layout=dict(
        paper_bgcolor="white", plot_bgcolor="white", hovermode="closest",
        colorway=EXPERT_COLORS[:10],
        font=dict(family="Inter, Segoe UI, Helvetica, Arial, sans-serif", size=13, color="#2a2a2a"),
        title=dict(x=0.02, xanchor="left", font=dict(size=16)),
        hoverlabel=dict(align="left", font=dict(size=12)),
        legend=dict(title=dict(font=dict(size=12))),
        margin=dict(l=70, r=30, t=70, b=60),
        xaxis=axis, yaxis=axis,
        coloraxis=dict(colorbar=dict(outlinewidth=0, ticks="")),
    ))


pio.templates[TEMPLATE] = _template()

__all__ = ["TEMPLATE", "EXPERT_COLORS", "SEVERITY_COLORS", "NEUTRAL", "ACCENT", "expert_color", "severity_color",
           "usage_colorscale"]
