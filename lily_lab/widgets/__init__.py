"""ipywidgets dashboards composed from ``lily_lab.plots``; they hold view state only."""

from .budget import BudgetCalculator
from .collapse import CollapseDashboard
from .dashboard import LilyDashboard, RoutingDashboard
from .experts import ExpertMap, SpectrumExplorer
from .router import RouterExplorer
from .timeline import TimelinePlayer

__all__ = ["LilyDashboard", "RoutingDashboard", "RouterExplorer", "ExpertMap", "SpectrumExplorer", "CollapseDashboard",
           "TimelinePlayer", "BudgetCalculator"]
