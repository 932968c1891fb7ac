"""The colours of a diagnosis' severities, in one place for the plots, the widgets, the HTML report
and ``Diagnosis._repr_html_``. Imports nothing, so every layer may use it (docs/architecture.md)."""

from __future__ import annotations

#: Diagnosis severities; ``ok`` for "no findings".
SEVERITY_COLORS: dict[str, str] = {"critical": "#c0392b", "warning": "#d68910", "ok": "#1e8449"}
