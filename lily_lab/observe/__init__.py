"""Watching routers during forward passes, and over training (imports only ``core``)."""

from .record import DEFAULT_MAX_TOKENS, Recorder, record_dataset, record_routing
from .routing import PHASES, Routing, RoutingError, SiteRecord
from .timeline import Timeline

__all__ = ["record_routing", "record_dataset", "Recorder", "Routing", "RoutingError", "SiteRecord",
           "Timeline", "RoutingCallback", "DEFAULT_MAX_TOKENS", "PHASES"]


def __getattr__(name: str):
    if name == "RoutingCallback":  # built on first use: it subclasses transformers' TrainerCallback
        from . import timeline

        return timeline.RoutingCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
