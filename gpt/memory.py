"""How much memory a model needs, and whether this machine has it: checked where a config comes from a user
(a recipe, a config.json, a checkpoint), before the model is built, so that an absurd size is one clear line
instead of a death in the allocator. The model itself trusts its config."""

from __future__ import annotations

import os
from typing import Optional

import torch

from gpt.config import GPTConfig
from gpt.errors import GPTError
from gpt.model import Block, make_norm


def physical_memory() -> Optional[int]:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that tells
        return None


def count_parameters(config: GPTConfig) -> int:
    """The parameters GPT(config) has, from one block built on the meta device (shapes only, no memory) times
    n_layer, and the embeddings' shapes: no model of absurd size is ever built, even on the meta device."""
    C, widest = config.n_embd, max(3 * config.n_embd, config.hidden_dim)
    if C * widest >= 2**62:  # beyond what torch can describe (its sizes are 64-bit): too large, whatever the rest
        return config.n_layer * C * widest
    with torch.device("meta"):
        block = sum(p.numel() for p in Block(config).parameters())
        final_norm = sum(p.numel() for p in make_norm(config).parameters())
    V = config.vocab_size or 0
    positions = config.block_size * C if config.pos_emb == "learned" else 0
    return V * C * (1 if config.tie_embeddings else 2) + positions + config.n_layer * block + final_norm


def check_fits_in_memory(config: GPTConfig) -> None:
    """A model whose weights alone exceed this machine's memory is refused before anything is allocated (a
    vocab_size of 10**12 would otherwise ask for terabytes and die in the allocator). Building on the meta
    device (shapes only) is always allowed."""
    if torch.empty(()).device.type == "meta":
        return
    n = count_parameters(config)
    need, have = n * torch.get_default_dtype().itemsize, physical_memory()
    if have and need > have:
        raise GPTError(
            f"impossible model config: {n:,} parameters need {need / 2**30:,.0f} GiB for the weights "
            f"alone, more than this machine's {have / 2**30:,.0f} GiB of memory; choose a smaller model "
            "(n_layer, n_embd, vocab_size, block_size)"
        )
