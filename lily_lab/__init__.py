"""lily_lab: Lily adapters, and tools to see what their routers and experts learned."""

from .core import (
    CheckpointError,
    LilyConfig,
    LilyConfigError,
    LilyLabError,
    LilyLayer,
    Site,
    TargetError,
    TargetTypeError,
    adapter_sites,
    adapter_summary,
    add_lily,
    count_parameters,
    load_adapter,
    remove_lily,
    save_adapter,
)

__version__ = "0.1.0"

__all__ = [
    "LilyConfig",
    "LilyLayer",
    "Site",
    "add_lily",
    "remove_lily",
    "adapter_sites",
    "adapter_summary",
    "count_parameters",
    "save_adapter",
    "load_adapter",
    "LilyLabError",
    "LilyConfigError",
    "TargetError",
    "TargetTypeError",
    "CheckpointError",
]
