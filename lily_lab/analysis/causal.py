"""``causal_consistency``: does a routed adapter on a causal LM let later tokens change earlier
outputs, and does cached generation compute what one forward pass over the same text does?

Two numbers per routing mode, measured on the user's own model and token ids:

- ``future_leak``: change only the last real token of every sequence (to another token id) and
  take the largest ``|Δ logit|`` at the real positions before it. A causal LM's output at
  position ``t`` may depend on positions ``≤ t`` only; ``batch`` and ``sequence`` routing mix the
  experts with a mean over the whole call or sequence, so the future leaks in.
- ``generation_drift``: greedy ``generate`` with its KV cache (``output_logits``) against one
  forward pass over the generated text, largest ``|Δ logit|`` at the generated positions. Each
  decode step sees only its new token, so a mixture over "the call" differs from the one a full
  pass applies.

``causal`` and ``token`` routing do neither (up to float rounding).
"""

from __future__ import annotations

import contextlib

import inspect
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..core import ROUTING_MODES, adapter_sites, set_lily_options
from ..core.errors import CausalConsistencyError, LilyConfigError, LilyLabTypeError, TargetError
from ..core.inject import get_state
from ..observe.record import device_of, evaluating

COLUMNS = ["routing", "future_leak", "generation_drift", "future_leak_base", "generation_drift_base", "sequences",
           "tokens", "new_tokens"]

#: Routing modes whose mixture is per sequence or finer: the two leak inputs can share one call.
_PER_SEQUENCE = frozenset({"sequence", "causal", "token"})


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` generates text left to right: it has ``generate``, says it can generate
    (transformers' ``can_generate``) and is not an encoder-decoder. Encoders (BERT) are not."""
    if not callable(getattr(model, "generate", None)):
        return False
    can = getattr(model, "can_generate", None)
    try:
        if callable(can) and not can():
            return False
    except (TypeError, AttributeError):
        return False
    config = getattr(model, "config", None)
    return not getattr(config, "is_encoder_decoder", False)


def causal_consistency(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                       max_new_tokens: int = 8, modes: Sequence[str] | None = None) -> pd.DataFrame:
    """Measure the future leak and the generation drift of ``model``'s routed adapter, per mode.

    ``model``: a causal LM (``generate``, outputs with ``.logits`` of shape batch × positions ×
    vocabulary) carrying a lily_lab Lily adapter or a PEFT Lily adapter. ``input_ids``: batch ×
    positions token ids, each sequence with at least 2 real tokens; ``attention_mask`` (1 = real
    token) may pad on either side (sequences are re-padded on the left, as ``generate`` expects).

    Returns one row per routing mode, with columns ``routing``, ``future_leak`` (the largest
    ``|Δ logit|`` at the real positions before the last real one when only the last real token
    of each sequence changes, to another token id), ``generation_drift`` (the largest ``|Δ logit|``
    between greedy ``generate`` with its KV cache and one forward pass over the generated text,
    at the ``max_new_tokens`` generated positions), ``future_leak_base`` and
    ``generation_drift_base`` (the same two measures with the adapter switched off: the base
    model's own floating-point rounding — 0 and about 6e-5 on SmolLM2-135M in float32 — against
    which the adapter's numbers are read), ``sequences``, ``tokens`` (real input tokens) and
    ``new_tokens`` (generated per sequence).

    ``modes=None``: for a lily_lab adapter every mode of ``lily_lab.core.ROUTING_MODES``, switched
    with ``set_lily_options(model, routing=...)`` and put back to the model's own mode afterwards
    (also on error); for a PEFT Lily adapter only ``"batch"``, its only behaviour (PEFT mixes over
    every token of a call). Runs without gradients in eval mode; every module's train/eval mode is
    put back afterwards.
    """
    owner, kind = _lily_owner(model)
    own = get_state(owner).config.routing if kind == "lily" else "batch"
    modes = _modes(kind, own, modes)
    if not is_causal_lm(model):
        raise LilyLabTypeError(f"causal_consistency needs a causal language model with generate() (a "
                               f"...ForCausalLM); {type(model).__name__} is not one")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise CausalConsistencyError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    device = device_of(model)
    ids, mask = _left_padded(input_ids, attention_mask, pad_token_id(model))
    ids, mask = ids.to(device), mask.to(device)
    forward = _forward_params(model)
    rows = []
    current = own
    try:
        with evaluating(model), torch.no_grad():
            vocab = vocab_size(model)
            with _adapter_off(model, owner, kind):  # the base model's own rounding, the floor of both measures
                base_leak = _future_leak(model, ids, mask, "token", forward, vocab)
                base_drift = _generation_drift(model, ids, mask, max_new_tokens, forward)
            for mode in modes:
                if kind == "lily" and mode != current:
                    set_lily_options(owner, routing=mode)
                    current = mode
                leak = _future_leak(model, ids, mask, mode if kind == "lily" else "batch", forward, vocab)
                drift = _generation_drift(model, ids, mask, max_new_tokens, forward)
                rows.append({"routing": mode, "future_leak": leak, "generation_drift": drift,
                             "future_leak_base": base_leak, "generation_drift_base": base_drift,
                             "sequences": int(ids.shape[0]), "tokens": int(mask.sum()),
                             "new_tokens": max_new_tokens})
    finally:
        if kind == "lily" and current != own:
            set_lily_options(owner, routing=own)
    return pd.DataFrame(rows, columns=COLUMNS)


# --------------------------------------------------------------------------- the two measures


@contextlib.contextmanager
def _adapter_off(model: nn.Module, owner: nn.Module, kind: str):
    """The adapter contributes nothing inside the block (lily_lab: scaling 0, so each site adds
    exactly zero; PEFT: its layers' adapters disabled); put back afterwards, also on error."""
    if kind == "lily":
        scaling = get_state(owner).config.scaling
        set_lily_options(owner, scaling=0.0)
        try:
            yield
        finally:
            set_lily_options(owner, scaling=scaling)
        return
    layers = [m for m in model.modules() if callable(getattr(m, "enable_adapters", None))
              and isinstance(getattr(m, "disable_adapters", None), bool)]
    was_off = [m.disable_adapters for m in layers]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m, off in zip(layers, was_off):
            m.enable_adapters(not off)


def _future_leak(model, ids, mask, mode, forward, vocab) -> float:
    """Largest |Δ logit| before the last position (every sequence ends there: left padding) when
    the last token of each sequence changes. Per-sequence modes run both inputs in one call;
    batch routing cannot (one mixture for the call would hide the leak), so it runs two."""
    other = ids.clone()
    other[:, -1] = (ids[:, -1] + 1) % vocab
    b = ids.shape[0]
    if mode in _PER_SEQUENCE:
        both = _logits(model, torch.cat([ids, other]), torch.cat([mask, mask]), forward)
        a, c = both[:b], both[b:]
    else:
        a, c = _logits(model, ids, mask, forward), _logits(model, other, mask, forward)
    keep = mask[:, :-1].bool()
    return float((a[:, :-1] - c[:, :-1]).float().abs()[keep].max())


def _generation_drift(model, ids, mask, new_tokens, forward) -> float:
    """Largest |Δ logit| between cached greedy generation and one forward pass, at the generated
    positions (EOS is held off so every sequence generates ``new_tokens``)."""
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, num_beams=1, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=pad_token_id(model))
    if not getattr(out, "logits", None):
        raise LilyLabTypeError(f"{type(model).__name__}.generate returned no logits (output_logits=True)")
    gen = torch.stack(out.logits, dim=1)  # (batch, new, V)
    seq = out.sequences
    n = gen.shape[1]
    full_mask = torch.cat([mask, mask.new_ones(len(seq), seq.shape[1] - mask.shape[1])], dim=1)
    keep_last = n + 1 if "logits_to_keep" in forward else None  # the LM head over these positions only
    full = _logits(model, seq, full_mask, forward, keep_last=keep_last)
    start = ids.shape[1] - 1
    ref = full[:, start:start + n] if keep_last is None else full[:, -(n + 1):-1]
    return float((gen.float() - ref.float()).abs().max())


def _logits(model, ids, mask, forward, keep_last: int | None = None) -> torch.Tensor:
    """One forward pass: logits (batch × positions × V), with the position ids ``generate``
    derives from the mask (so left padding shifts nothing) and no KV cache built."""
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if "position_ids" in forward:
        kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    if "use_cache" in forward:
        kwargs["use_cache"] = False
    if keep_last is not None:
        kwargs["logits_to_keep"] = keep_last
    out = model(**kwargs)
    logits = getattr(out, "logits", None)
    want = ids.shape[1] if keep_last is None else keep_last
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != (ids.shape[0], want):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else None
        raise LilyLabTypeError(
            f"causal_consistency needs a causal LM whose outputs have .logits of shape batch × positions × "
            f"vocabulary ({ids.shape[0]} × {want} × V here); {type(model).__name__} gave "
            f"{'no .logits' if shape is None else f'logits of shape {shape}'}")
    return logits


# --------------------------------------------------------------------------- inputs and the model


def _lily_owner(model: nn.Module) -> tuple[nn.Module, str]:
    """The module that holds the lily_lab adapter's state and ``"lily"``, or ``model`` and
    ``"peft-lily"``; raises when there is no Lily adapter."""
    if get_state(model) is not None:
        return model, "lily"
    kinds = {s.kind for s in adapter_sites(model)}
    if "lily" in kinds:
        owner = next((m for m in model.modules() if get_state(m) is not None), None)
        if owner is not None:
            return owner, "lily"
    if "peft-lily" in kinds:
        return model, "peft-lily"
    what = ("a PEFT X-LoRA adapter (its scalings are read by record_routing; causal_consistency measures Lily's "
            "routing modes)" if "xlora" in kinds else "a PEFT LoRA adapter, which has no router" if kinds
            else "no adapter")
    raise TargetError(f"causal_consistency needs a model with a Lily adapter (lily_lab's add_lily / load_adapter, "
                      f"or PEFT's Lily); this one has {what}")


def _modes(kind: str, own: str, modes: Iterable[str] | str | None) -> list[str]:
    if modes is None:
        return list(ROUTING_MODES) if kind == "lily" else ["batch"]
    modes = [modes] if isinstance(modes, str) else list(modes)
    unknown = [m for m in modes if m not in ROUTING_MODES]
    if unknown:
        raise LilyConfigError(f"unknown routing mode(s) {unknown}; choose from {list(ROUTING_MODES)}")
    if kind == "peft-lily" and set(modes) - {"batch"}:
        raise CausalConsistencyError(
            "a PEFT Lily adapter routes one way only (a mixture over every token of the call: 'batch'); to measure "
            "other modes, load it into lily_lab with lily_lab.load_adapter(base_model, folder) first")
    if not modes:
        raise CausalConsistencyError("modes is empty: name at least one routing mode (or pass None for all)")
    return list(dict.fromkeys(modes))


def _left_padded(input_ids, attention_mask, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` with every sequence's real tokens moved to the right end (left padding with
    ``pad_id``); raises on a wrong shape or a sequence of fewer than 2 real tokens."""
    if not isinstance(input_ids, torch.Tensor):
        raise LilyLabTypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise CausalConsistencyError(f"input_ids must be 2-D (batch × positions), got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise CausalConsistencyError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    if attention_mask is None:
        mask = torch.ones_like(input_ids)
    else:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise CausalConsistencyError(f"attention_mask must be a tensor shaped like input_ids "
                                         f"{tuple(input_ids.shape)}, got {shape}")
        mask = (attention_mask != 0).to(input_ids.dtype)
    lengths = mask.sum(dim=1)
    short = torch.nonzero(lengths < 2).flatten().tolist()
    if short:
        raise CausalConsistencyError(f"every sequence needs at least 2 real tokens (one to change, one before it); "
                                     f"sequence(s) {short[:8]} have {lengths[short[:8]].tolist()}")
    ids, mask = input_ids.long(), mask.long()
    t = ids.shape[1]
    if bool((mask[:, 1:] >= mask[:, :-1]).all()):  # 0 … 0 1 … 1 in every row: already left-padded
        return ids, mask
    out_ids = torch.full_like(ids, pad_id)
    out_mask = torch.zeros_like(mask)
    for i in range(len(ids)):
        real = ids[i][mask[i].bool()]
        out_ids[i, t - len(real):] = real
        out_mask[i, t - len(real):] = 1
    return out_ids, out_mask


def pad_token_id(model: nn.Module) -> int:
    """The model's pad token id, else its EOS id, else 0 (what ``generate`` pads finished rows
    with); an id the model cannot embed is skipped."""
    try:
        vocab = vocab_size(model)
    except LilyLabTypeError:
        vocab = None
    for config in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(config, attr, None) if config is not None else None
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if isinstance(value, (int, np.integer)) and 0 <= value < (vocab or value + 1):
                return int(value)
    return 0


def vocab_size(model: nn.Module) -> int:
    """Token ids the model embeds (the input embedding's rows), else its config's vocab_size."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        emb = None
    n = getattr(emb, "num_embeddings", None)
    if n is None:
        n = getattr(getattr(model, "config", None), "vocab_size", None)
    if not n or n < 2:
        raise LilyLabTypeError(f"cannot tell the vocabulary size of {type(model).__name__} "
                               "(no input embedding, no config.vocab_size)")
    return int(n)


def _forward_params(model: nn.Module) -> set[str]:
    """Keyword names the model's forward takes (a PEFT model's: its base model's)."""
    target = model
    base = getattr(model, "get_base_model", None)
    if callable(base):
        try:
            target = base()
        except (AttributeError, TypeError):
            target = model
    try:
        return set(inspect.signature(target.forward).parameters)
    except (TypeError, ValueError):
        return set()


def recorded_sequences(routing, max_sequences: int = 4, max_length: int = 64) -> list[np.ndarray]:
    """Token ids of up to ``max_sequences`` sequences rebuilt from a recording's sampled tokens
    (``routing.record(site).tokens``: ``sequence``, ``position``, ``token_id``), each cut to its
    first ``max_length`` tokens. A sequence counts when its recorded positions are contiguous
    (none missing between the first and the last) and every token id is known (≥ 0), with at
    least 2 tokens. A site whose sample holds every token it saw is read alone; otherwise the
    samples of all sites are pooled. Empty when nothing qualifies (record with ``max_tokens``
    at least the tokens recorded, and call the model with ``input_ids``)."""
    sites = list(routing.sites)
    if not sites:
        return []
    complete = [s for s in sites if routing.record(s).tokens.seen == len(routing.record(s).tokens)]
    chosen = complete[:1] or sites
    seq = np.concatenate([routing.record(s).tokens.columns["sequence"] for s in chosen])
    pos = np.concatenate([routing.record(s).tokens.columns["position"] for s in chosen])
    tok = np.concatenate([routing.record(s).tokens.columns["token_id"] for s in chosen])
    if not len(seq):
        return []
    order = np.lexsort((pos, seq))
    seq, pos, tok = seq[order], pos[order], tok[order]
    first = np.ones(len(seq), dtype=bool)
    first[1:] = (seq[1:] != seq[:-1]) | (pos[1:] != pos[:-1])  # one row per (sequence, position)
    seq, pos, tok = seq[first], pos[first], tok[first]
    out: list[np.ndarray] = []
    starts = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])
    ends = np.r_[starts[1:], len(seq)]
    for a, b in zip(starts, ends):
        p, ids = pos[a:b], tok[a:b]
        if b - a < 2 or p[-1] - p[0] != b - a - 1 or (ids < 0).any():
            continue
        out.append(ids[:max_length].astype(np.int64))
        if len(out) == max_sequences:
            break
    return out


def batch_of(sequences: list[np.ndarray], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``: ``sequences`` left-padded with ``pad_id`` into one batch."""
    t = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), t), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, t - len(s):] = torch.as_tensor(s)
        mask[i, t - len(s):] = 1
    return ids, mask
