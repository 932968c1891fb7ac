"""The findings of ``diagnose`` as HTML, one definition for every page that shows them: the place
names, counts, evidence tables and cards of the HTML report and of the Diagnosis widget.

Like the rest of ``plots`` this knows plain values only (a finding is read by its attributes) and
imports nothing else from lily_lab. Every text from the model or the data comes out HTML-escaped.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ..core.errors import LilyLabTypeError
from ._common import _GROUP, bank_label, escape, layer_of, site_label
from .theme import NEUTRAL, SEVERITY_COLORS

#: A plain-words title per finding kind (the kind code goes beside it).
KIND_TITLES = {
    "dominant_expert": "One expert takes (almost) everything",
    "dead_expert": "An expert that is (almost) never used",
    "input_blind_router": "A router that ignores its input",
    "redundant_experts": "Experts that are near copies of each other",
    "inactive_adapter": "An adapter that has learned nothing yet",
    "future_leak": "Later tokens change earlier outputs (routing is not causal)",
    "nonfinite_weights": "NaN or infinite weights: the training run diverged",
}

#: Evidence keys whose words are not just the key with spaces.
_EVIDENCE_NAMES = {"routing_mi": "routing MI", "max_norm": "max ‖B‖", "mean_norm": "mean ‖B‖"}

#: Places named in a card's "where" line before "(+N more)".
_WHERE_SHOWN = 12

FINDING_CSS = f"""
.lily-finding {{ border: 1px solid #e4e4e4; border-left: 6px solid {NEUTRAL}; border-radius: 4px;
  padding: .6em 1em; margin: 1em 0; background: #fbfbfb; line-height: 1.45; color: #222; }}
.lily-finding.critical {{ border-left-color: {SEVERITY_COLORS['critical']}; }}
.lily-finding.warning {{ border-left-color: {SEVERITY_COLORS['warning']}; }}
.lily-finding .head {{ margin-bottom: .2em; }}
.lily-finding .head code {{ color: #666; font-size: 12px; }}
.lily-finding .severity {{ color: white; border-radius: 3px; padding: 1px 6px; font-size: 12px; font-weight: bold;
  text-transform: uppercase; background: {NEUTRAL}; }}
.lily-finding .severity.critical {{ background: {SEVERITY_COLORS['critical']}; }}
.lily-finding .severity.warning {{ background: {SEVERITY_COLORS['warning']}; }}
.lily-finding .where span[title] {{ border-bottom: 1px dotted #999; }}
.lily-finding .none {{ color: #666; font-style: italic; }}
.lily-finding table.evidence {{ border-collapse: collapse; font-size: 12px; margin: .3em 0 .5em; }}
.lily-finding table.evidence th, .lily-finding table.evidence td {{ border-bottom: 1px solid #e8e8e8;
  padding: 2px 10px 2px 0; text-align: left; }}
.lily-finding table.evidence td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
.lily-finding table.evidence thead th + th {{ text-align: right; }}
"""


def number_label(value: Any, digits: int = 3) -> str:
    """A number as a table shows it (plain text, not escaped): integers with thousands separators,
    others to ``digits`` decimals (tiny or huge ones in scientific notation), NaN as a dash;
    anything that is not a number as ``str(value)``."""
    if isinstance(value, (bool, np.bool_)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not np.isfinite(v):
        return "–" if np.isnan(v) else str(v)
    if v != 0 and (abs(v) < 10 ** -digits or abs(v) >= 1e6):
        return f"{v:.{digits - 1}e}"
    return f"{v:,.{digits}f}"


def place_label(key: Any, scope: str = "site") -> str:
    """The display name of a place a finding names, escaped. A group key (``scope="bank"``, or a
    key of the form ``target:OUTxIN``) reads as its bank, ``query bank (384×384)``; a site's module
    path as ``site_label`` of its last component and the layer number in the path:
    ``encoder.layer.3.attention.self.query`` → ``query · layer 3``,
    ``base_model.model.model.layers.3.self_attn.q_proj`` → ``q_proj · layer 3``. String work only."""
    key = "" if key is None else str(key)
    if scope == "bank" or _GROUP.match(key):
        return bank_label(key)
    return site_label(key.rsplit(".", 1)[-1], layer_of(key))


def count_label(n: int, scope: str) -> str:
    """How many places a finding names: ``1 site``, ``2 sites``, ``1 bank``, ``2 banks``
    (``scope`` is the finding's: ``"bank"`` or ``"site"``)."""
    what = "bank" if scope == "bank" else "site"
    return f"{n} {what}{'' if n == 1 else 's'}"


def _key_html(key: Any) -> str:
    """An evidence key in words, escaped: ``max_usage`` → ``max usage``."""
    return escape(_EVIDENCE_NAMES.get(str(key), str(key).replace("_", " ")))


def _value_html(value: Any) -> tuple[str, bool]:
    """An evidence value as escaped HTML, and whether it is one number (right-aligned)."""
    if isinstance(value, dict):  # nested: key: value pairs, never a Python dict
        return escape("; ".join(f"{k}: {number_label(v, 4)}" for k, v in value.items())), False
    if isinstance(value, (list, tuple, np.ndarray)):
        return escape(", ".join(number_label(v) if isinstance(v, (float, np.floating)) else str(v)
                                for v in value)), False
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
        return escape(number_label(value, 4)), True
    return escape(value), False


def _cell(value: Any) -> str:
    shown, num = _value_html(value)
    return f"<td class='num'>{shown}</td>" if num else f"<td>{shown}</td>"


def evidence_html(evidence: dict, sites: list, scope: str) -> str:
    """A finding's evidence as small HTML tables, escaped: one with a row per place (the finding's
    ``sites`` first, named by ``place_label`` with the full key as a tooltip) and a column per
    measure whose value maps places to numbers (``{"routing_mi": {site: 0.004}}``), then one of
    key → value rows for the rest. Keys read as words, numbers are rounded."""
    if evidence is not None and not isinstance(evidence, dict):
        raise LilyLabTypeError(f"evidence_html: evidence must be a dict (a Finding's evidence), got "
                               f"{type(evidence).__name__}")
    evidence = dict(evidence or {})
    per_place = {k: v for k, v in evidence.items() if isinstance(v, dict)}
    scalars = {k: v for k, v in evidence.items() if not isinstance(v, dict)}
    out = []
    if per_place:
        places = [s for s in sites if any(s in v for v in per_place.values())]
        places += list(dict.fromkeys(p for v in per_place.values() for p in v if p not in places))
        head = "".join(f"<th>{_key_html(k)}</th>" for k in per_place)
        rows = "".join(
            f'<tr><td title="{escape(p)}">{place_label(p, scope)}</td>'
            + "".join(_cell(v[p]) if p in v else "<td>–</td>" for v in per_place.values()) + "</tr>"
            for p in places[:_WHERE_SHOWN])
        if len(places) > _WHERE_SHOWN:  # a 32-layer model: the first rows say enough, the count says the rest
            rows += (f"<tr><td colspan='{1 + len(per_place)}'>… and {len(places) - _WHERE_SHOWN} more "
                     f"{'banks' if scope == 'bank' else 'sites'}</td></tr>")
        out.append(f"<table class='evidence'><thead><tr><th>{'bank' if scope == 'bank' else 'site'}</th>{head}"
                   f"</tr></thead><tbody>{rows}</tbody></table>")
    if scalars:
        rows = "".join(f"<tr><th>{_key_html(k)}</th>{_cell(v)}</tr>" for k, v in scalars.items())
        out.append(f"<table class='evidence'><tbody>{rows}</tbody></table>")
    return "".join(out) or "<span class='none'>no evidence recorded</span>"


def _css_class(severity: Any) -> str:
    """``severity`` as a class name when it is one plain word (so data cannot add classes)."""
    s = str(severity)
    return f" {s}" if re.fullmatch(r"[A-Za-z][\w-]*", s) else ""


def finding_html(finding: Any) -> str:
    """One finding as a card, escaped: the severity badge, what is wrong in plain words with the
    kind code beside it, the summary, where (``where (2 banks): query bank (32×32), …``, full keys
    as tooltips), the evidence table and what to try. ``finding`` needs the attributes ``kind``,
    ``severity``, ``summary``, ``sites``, ``evidence``, ``remedy`` and ``scope`` (a
    ``diagnose`` ``Finding``); style it with ``FINDING_CSS``."""
    missing = [a for a in ("kind", "severity", "summary", "sites", "evidence", "remedy", "scope")
               if not hasattr(finding, a)]
    if missing:
        raise LilyLabTypeError(f"finding_html: finding must be a diagnose Finding (diagnosis.findings[i]); this "
                               f"{type(finding).__name__} has no {', '.join(missing)}")
    scope = finding.scope
    sites = list(finding.sites)
    where = ", ".join(f'<span title="{escape(s)}">{place_label(s, scope)}</span>' for s in sites[:_WHERE_SHOWN])
    where += f" (+{len(sites) - _WHERE_SHOWN} more)" if len(sites) > _WHERE_SHOWN else ""
    kind, cls = str(finding.kind), _css_class(finding.severity)
    title = KIND_TITLES.get(kind, kind.replace("_", " "))
    summary = f"<div class='summary'>{escape(finding.summary)}</div>" if finding.summary else ""
    return (f"<div class='lily-finding{cls}'>"
            f"<div class='head'><span class='severity{cls}'>{escape(finding.severity)}</span> "
            f"<b>{escape(title)}</b> <code>{escape(kind)}</code></div>{summary}"
            f"<div class='where'><b>where</b> ({count_label(len(sites), scope)}): {where}</div>"
            f"<div class='evidence'>{evidence_html(finding.evidence, sites, scope)}</div>"
            f"<div class='remedy'><b>try:</b> {escape(finding.remedy)}</div></div>")


__all__ = ["place_label", "count_label", "number_label", "evidence_html", "finding_html", "FINDING_CSS",
           "KIND_TITLES"]
