"""The engine's prefix cache (gpt/engine.py): the keys and values of token sequences read before, kept so that a
prompt that starts like an earlier one (a system prompt, a few-shot header, the conversation so far) is read only
from where the two part.

They are kept in blocks of `block` tokens: block i of a sequence holds the keys and values of its positions
[i * block, (i + 1) * block), for every layer, and is found by the sequence's tokens up to the block's end (the
whole prefix, not a hash of it: no collision can hand one prompt another's keys). That is all they depend on:
attention is causal, and every row of the engine's batch counts its positions from its own first token, so the
same tokens have the same keys and values wherever and beside whatever they were read (up to the last bits of
the arithmetic, as for a prompt read in a batch). A prompt reuses its longest run of cached blocks, leaving at
least its last token to read (the model's next-token logits come from that).

Least recently used blocks go first, within `capacity` tokens. A lookup or a store touches a sequence's blocks
deepest first, so a block is always used more recently than the blocks that continue it: eviction takes the ends
of sequences first, and a cached block's parent is always cached (a lookup never meets a gap).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch

Block = tuple[torch.Tensor, torch.Tensor]  # keys, values: (n_layer, kv heads, block, head_dim) each


class PrefixCache:
    def __init__(self, capacity: int, block: int):
        self.block = block
        self.blocks_max = capacity // block
        self.blocks: OrderedDict[tuple[int, ...], Block] = OrderedDict()
        self.reused = 0  # tokens read from the cache rather than computed, all requests together
        self.stored = 0  # tokens' keys and values put in the cache, all requests together

    @property
    def tokens(self) -> int:
        """Tokens whose keys and values the cache holds now."""
        return len(self.blocks) * self.block

    def chain(self, ids: Sequence[int], n: int) -> list[tuple[int, ...]]:
        return [tuple(ids[: (i + 1) * self.block]) for i in range(min(n, self.blocks_max))]

    def touch(self, keys: list[tuple[int, ...]]) -> None:
        for key in reversed(keys):  # the deepest first: a block is used more recently than what continues it
            self.blocks.move_to_end(key)

    def lookup(self, ids: Sequence[int]) -> list[Block]:
        """The cached blocks of the longest cached prefix of `ids` that leaves at least one token to read."""
        found = []
        for key in self.chain(ids, (len(ids) - 1) // self.block):
            if key not in self.blocks:
                break
            found.append(key)
        self.touch(found)
        self.reused += len(found) * self.block
        return [self.blocks[key] for key in found]

    def store(self, ids: Sequence[int], read: Callable[[int, int], Block]) -> None:
        """Keep the keys and values of `ids`' whole blocks. read(start, end): those of positions [start, end),
        called once, for the blocks not cached yet (the cached ones of a sequence are always its first ones)."""
        keys = self.chain(ids, len(ids) // self.block)
        first = next((i for i, key in enumerate(keys) if key not in self.blocks), len(keys))
        if first < len(keys):
            k, v = read(first * self.block, len(keys) * self.block)
            for i, key in enumerate(keys[first:]):
                part = slice(i * self.block, (i + 1) * self.block)
                # copies: a block owns its memory, so evicting it frees it whatever else is kept
                self.blocks[key] = (k[:, :, part].clone(), v[:, :, part].clone())
            self.stored += (len(keys) - first) * self.block
        self.touch(keys)
        while len(self.blocks) > self.blocks_max:
            self.blocks.popitem(last=False)
