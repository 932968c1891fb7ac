"""Routing while training: router metrics in the logs a run already writes, and an early warning.

``RoutingMonitor`` (any training loop) and ``RoutingCallback`` (transformers' ``Trainer``) sit
above ``analysis``: they turn recordings into metrics and run ``diagnose``'s checks. The keys they
log and the warning's rules are in docs/monitoring.md.
"""

from .monitor import PREFIX, STATS, SUMMARY_METRICS, WATCHED, EarlyWarning, RoutingMonitor, bank_labels

__all__ = ["RoutingMonitor", "RoutingCallback", "EarlyWarning", "bank_labels", "PREFIX", "SUMMARY_METRICS", "STATS",
           "WATCHED"]


def __getattr__(name: str):
    if name == "RoutingCallback":  # built on first use: it subclasses transformers' TrainerCallback
        from .callback import routing_callback_class

        return routing_callback_class()
    raise AttributeError(f"module 'lily_lab.monitor' has no attribute {name!r}")
