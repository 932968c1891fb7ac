"""lily_lab's exceptions.

Every error lily_lab raises on bad input is a :class:`LilyLabError`. The subclasses are also the
builtin exception a Python user would expect (``ValueError`` for a wrong value, ``TypeError`` for a
wrong kind of argument, ``FileNotFoundError`` for a missing file), so ``except ValueError`` keeps
working. :class:`InputError`, :class:`LilyLabTypeError` and :class:`LilyLabFileError` are the general
ones; the others say which part of lily_lab refused. Every one of them is defined here (the
modules that raise them re-export theirs: ``lily_lab.app.llm.ChatTemplateError`` is this class).

This module imports nothing, so every layer may raise these (``plots`` included: tests/test_architecture.py),
and check a count with :func:`check_positive_int`.
"""

from __future__ import annotations


class LilyLabError(Exception):
    """Base class of every error lily_lab raises on bad input."""


class InputError(LilyLabError, ValueError):
    """An argument has a value lily_lab cannot use: an unknown name, site, mode or column, an empty
    input, a number out of range. The message names the argument and what would be right."""


class LilyConfigError(LilyLabError, ValueError):
    """A configuration value is out of range, or a config file is malformed."""


class TargetError(LilyLabError, ValueError):
    """``target_modules`` matched nothing, or the model is already adapted."""


class LilyLabTypeError(LilyLabError, TypeError):
    """An argument of the wrong kind (a dict where a ``LilyConfig`` belongs, say)."""


class LilyLabFileError(LilyLabError, OSError):
    """A file or folder named in an argument cannot be used: a folder where a file belongs, a
    folder that cannot be written to, a file that cannot be written. The message names the path."""


class LilyLabFileNotFoundError(LilyLabFileError, FileNotFoundError):
    """A file or folder named in an argument does not exist. The message names the path."""


class TargetTypeError(LilyLabTypeError):
    """A matched module is not a layer Lily can wrap (``nn.Linear`` or transformers' ``Conv1D``)."""


class CheckpointError(LilyLabError, ValueError):
    """An adapter directory is missing, corrupted, or does not fit the model."""


class NonFiniteWeightsError(LilyLabError, ValueError):
    """An adapter's ``A``, ``B`` or router (or a base weight) holds NaN or infinite values: the run
    diverged, and an analysis of those weights would be meaningless."""


class MixtureError(LilyLabError, ValueError):
    """A mixture given to an analysis (``delta_spectra``, ``merge_at``, …) has the wrong size or
    holds NaN or infinite weights."""


class RoutingError(LilyLabError, ValueError):
    """A recording was asked for something it does not hold, or a routing file is unreadable."""


class FSDPLayoutError(LilyLabError, ValueError):
    """An FSDP layout lily_lab cannot plan or check: no Lily sites, unknown modules or layers."""


class FSDPSplitError(FSDPLayoutError):
    """An FSDP layout puts the sites sharing one ``A`` or ``B`` in different units."""


class CausalConsistencyError(LilyLabError, ValueError):
    """``causal_consistency`` cannot measure this input (too short, wrong shape, a mode PEFT lacks)."""


class ChatTemplateError(LilyLabError, ValueError):
    """The tokenizer has no chat template, or its template cannot frame the question and answer."""


def check_positive_int(value, name: str, *, where: str | None = None, minimum: int = 1, none_ok: bool = False):
    """``value`` as an ``int``, once it is an integer ≥ ``minimum`` (an ``int`` or a NumPy integer,
    anything with ``__index__``; never a ``bool``), or ``None`` when ``none_ok`` and it is ``None``.
    Else an :class:`InputError` naming the argument, after ``where`` (the function) when given:
    ``"batch_indices: steps must be an integer ≥ 0, got -1"``. Every lily_lab count is checked here."""
    if value is None and none_ok:
        return None
    prefix = f"{where}: " if where else ""
    wanted = f"{prefix}{name} must be an integer ≥ {minimum}{' or None' if none_ok else ''}"
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise InputError(f"{wanted}, got {value!r}")
    try:
        number = value.__index__()
    except TypeError:  # an array of several numbers has __index__ and refuses it
        raise InputError(f"{wanted}, got {value!r}") from None
    if number < minimum:
        raise InputError(f"{wanted}, got {number!r}")
    return number
