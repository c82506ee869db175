"""PEFT's saved-adapter key format, and the guard that keeps it from loading silently.

PEFT saves a MiSS block of module ``<path>`` as ``base_model.model.<path>.miss_block``: the
adapter name is dropped (it comes back at load time). A MissLinear's parameter is
``<path>.miss_block.<adapter>``, so such a file matches no key of an injected model and
``load_state_dict(strict=False)`` would load nothing without a word. :func:`reject_peft_keys`,
a load_state_dict pre-hook of every MissLinear (and a model-level one that :func:`miss_ext.inject`
adds), raises instead and names the loader.
"""

from __future__ import annotations

from typing import Optional

PEFT_PREFIX = "base_model.model."
BLOCK = "miss_block"


def peft_key(module_name: str) -> str:
    """The key PEFT's ``save_pretrained`` gives the block of module ``module_name``."""
    return f"{PEFT_PREFIX}{module_name}.{BLOCK}"


def module_of_peft_key(key: str) -> Optional[str]:
    """``<path>`` for a key ``base_model.model.<path>.miss_block``, else None."""
    suffix = "." + BLOCK
    if key.startswith(PEFT_PREFIX) and key.endswith(suffix) and len(key) > len(PEFT_PREFIX) + len(suffix):
        return key[len(PEFT_PREFIX) : -len(suffix)]
    return None


def refuse_peft_key(key: str, own: str) -> None:
    raise RuntimeError(
        f"load_state_dict: key {key!r} is a MiSS block in PEFT's saved-adapter format (no adapter "
        f"name), which matches no parameter of this model (MissLinear blocks are "
        f"'{own}.<adapter>'), so nothing would load. Load a PEFT adapter directory with "
        f"miss_ext.load_adapter(model, path), or map the keys first with "
        f"miss_ext.peft.to_miss_ext_state_dict(state_dict, adapter_name)"
    )


def reject_peft_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
    """load_state_dict pre-hook of a MissLinear: ``<its prefix>miss_block`` (no adapter name) is
    a block in PEFT's file format. Only keys under the layer's own prefix reach it (torch hands
    each module the part of the state dict below it): the model-level hook that
    :func:`miss_ext.inject` registers covers the others."""
    own = prefix + BLOCK
    if own in state_dict:
        refuse_peft_key(own, own)
