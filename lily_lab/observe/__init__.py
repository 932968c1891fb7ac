"""Watching routers during forward passes, and over training (imports only ``core``).

The training-time callback and monitor, which turn these recordings into logged metrics, are in
``lily_lab.monitor`` (above ``analysis``).
"""

from .record import DEFAULT_MAX_TOKENS, Recorder, record_dataset, record_routing
from .routing import PHASES, Routing, RoutingError, SiteRecord
from .timeline import Timeline, bank_snapshot

__all__ = ["record_routing", "record_dataset", "Recorder", "Routing", "RoutingError", "SiteRecord",
           "Timeline", "bank_snapshot", "DEFAULT_MAX_TOKENS", "PHASES"]
