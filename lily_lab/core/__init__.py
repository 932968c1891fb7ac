"""The Lily adapter itself: config, layer, injection and sharing, sites, checkpoints (torch only)."""

from .checkpoint import load_adapter, save_adapter
from .config import ROUTING_MODES, LilyConfig
from .errors import (CheckpointError, InputError, LilyConfigError, LilyLabError, LilyLabFileError,
                     LilyLabFileNotFoundError, LilyLabTypeError, MixtureError, NonFiniteWeightsError, TargetError,
                     TargetTypeError)
from .inject import add_lily, remove_lily, set_lily_options
from .layer import LilyLayer, RoutingEvent, lily_aux_loss
from .routers import RouterSite, router_sites
from .sites import Site, adapter_sites, adapter_summary, count_parameters, lily_parameter_formula

__all__ = [
    "LilyConfig", "ROUTING_MODES", "LilyLayer", "RoutingEvent", "Site", "RouterSite", "router_sites",
    "add_lily", "remove_lily", "set_lily_options", "lily_aux_loss", "adapter_sites", "adapter_summary", "count_parameters",
    "lily_parameter_formula", "save_adapter", "load_adapter",
    "LilyLabError", "LilyConfigError", "TargetError", "TargetTypeError", "CheckpointError",
    "NonFiniteWeightsError", "MixtureError", "InputError", "LilyLabTypeError", "LilyLabFileError",
    "LilyLabFileNotFoundError",
]
