"""Rows of the model's KV cache (gpt/model.py's KVCache) as the serving engine (gpt/engine.py) moves them: which
columns of a row hold real positions, a row's keys and values read out (what the prefix cache keeps,
gpt/prefixcache.py), a new cache whose rows start from cached blocks (a prompt read after its cached prefix), and
rows of several caches packed into one (the batch regrouped when requests join and leave). Tensor work only: no
requests, threads or sampling here.

Every row counts its positions itself (cache.seen) and the mask (cache.valid) says which columns are real, so a
row's real positions may sit anywhere in the buffer as long as they keep their order: padding in front of the
shorter rows, as with left padding.
"""

from __future__ import annotations

import torch

from gpt.model import KVCache


def real_columns(cache: KVCache) -> torch.Tensor:
    """(rows, max_len) bool: the columns written so far and, of those, the real ones (cache.valid is not kept
    beyond `length` yet)."""
    valid = (torch.arange(cache.max_len, device=cache.k[0].device) < cache.length).expand(cache.k[0].size(0), -1)
    return valid & cache.valid if cache.valid is not None else valid


def reader(cache: KVCache, row: int):
    """read(start, end): the keys and values of a row's real positions [start, end), (n_layer, heads, end - start,
    head_dim) each (PrefixCache.store's argument)."""

    def read(start: int, end: int):
        cols = real_columns(cache)[row].nonzero()[start:end, 0]
        return torch.stack([k[row][:, cols] for k in cache.k]), torch.stack([v[row][:, cols] for v in cache.v])

    return read


def start_from_blocks(cache: KVCache, hits: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> list[int]:
    """Fill a new (empty) cache of len(hits) rows with each row's cached blocks `hits` (keys, values: (n_layer,
    heads, block, head_dim) each), ending at one shared column, padding in front of the shorter ones; the rest of
    each prompt is then read into it as usual. Returns each row's count of cached positions (all 0: the cache is
    left empty)."""
    reused = [sum(k.size(2) for k, _ in hit) for hit in hits]
    P = max(reused, default=0)
    if P:
        first = next(hit[0][0] for hit in hits if hit)  # (n_layer, heads, block, head_dim)
        B, (n_layer, H, _, D) = len(hits), first.shape
        cache.k = [first.new_zeros(B, H, cache.max_len, D) for _ in range(n_layer)]
        cache.v = [first.new_zeros(B, H, cache.max_len, D) for _ in range(n_layer)]
        cache.valid = torch.zeros(B, cache.max_len, dtype=torch.bool, device=first.device)
        for row, hit in enumerate(hits):
            if hit:
                k, v = torch.cat([k for k, _ in hit], 2), torch.cat([v for _, v in hit], 2)
                for layer in range(n_layer):
                    cache.k[layer][row, :, P - reused[row] : P] = k[layer]
                    cache.v[layer][row, :, P - reused[row] : P] = v[layer]
                cache.valid[row, P - reused[row] : P] = True
        cache.seen = torch.tensor(reused, device=first.device)
        cache.length = P
    return reused


def pack_rows(parts: list[tuple[KVCache, list[int]]], out: KVCache) -> KVCache:
    """A cache of the given rows of the given caches, each row's real positions moved (in order) to the
    columns just before one shared end column L, the longest row's count; padding in front, as with left
    padding. The rows' position counts (cache.seen) come along, so decoding goes on as before."""
    valids = []
    for cache, rows in parts:
        valids.append(real_columns(cache)[rows])
    L = max(int(v.sum(1).max()) for v in valids)
    picked_k, picked_v, picked_valid = [[] for _ in out.k], [[] for _ in out.k], []
    for (cache, rows), valid in zip(parts, valids):
        # a stable sort of valid (False < True) lists a row's padding columns first, then its real ones in order
        src = torch.sort(valid.int(), dim=1, stable=True).indices[:, -L:]  # (rows, L)
        picked_valid.append(valid.gather(1, src))
        at = torch.tensor(rows, device=src.device)[:, None]
        for layer in range(len(out.k)):
            # advanced indices around a slice: the result is (rows, L, heads, head_dim)
            picked_k[layer].append(cache.k[layer][at, :, src].transpose(1, 2))
            picked_v[layer].append(cache.v[layer][at, :, src].transpose(1, 2))
    for layer in range(len(out.k)):
        k = torch.cat(picked_k[layer])
        B, H, _, D = k.shape
        # zeros, not empty: a masked column's weight is 0, and 0 * NaN from uninitialised memory would be NaN
        out.k[layer] = k.new_zeros(B, H, out.max_len, D)
        out.v[layer] = k.new_zeros(B, H, out.max_len, D)
        out.k[layer][:, :, :L] = k
        out.v[layer][:, :, :L] = torch.cat(picked_v[layer])
    valid = torch.cat(picked_valid)
    out.valid = torch.zeros(valid.size(0), out.max_len, dtype=torch.bool, device=valid.device)
    out.valid[:, :L] = valid
    out.seen = valid.sum(1)
    out.length = L
    out.start_decoding()
    return out
