"""Scoring token sequences: the log-probability the model gives each token of a text, the greedy choice at each
position and the most likely alternatives. One implementation for everything that asks "how likely is this
text": lm-evaluation-harness's loglikelihood requests (gpt/harness.py) and the server's `logprobs` / `echo`
(gpt/serve.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from gpt.model import GPT


@dataclass
class Scored:
    """Per scored position t (the token at t + 1 of the sequence given its prefix), as float32 on the CPU."""

    logprobs: torch.Tensor  # (n,) log p(token | prefix)
    greedy: torch.Tensor  # (n,) the most likely token at each position
    top_ids: Optional[torch.Tensor] = None  # (n, k) the k most likely tokens, most likely first
    top_logprobs: Optional[torch.Tensor] = None  # (n, k) their log-probabilities


@torch.no_grad()
def score_sequences(model: GPT, seqs: list[list[int]], top: int = 0, batch_size: int = 16) -> list[Scored]:
    """For each sequence (2 to block_size + 1 tokens), the log-probability of each token after the first given
    the ones before it. Sequences are run in batches of similar length, right-padded: with causal attention a
    position never sees the padding after it, so no mask is needed and each row's numbers are its own.
    Sequences whose inputs (all tokens but the last) are equal share one row: the choices of a multiple-choice
    question whose answers are one token each take one forward pass. The log-softmax, the gathers and the top-k
    are taken on the model's device; only the (n,) / (n, k) results move to the CPU."""
    block = model.config.block_size
    device = next(model.parameters()).device
    out: list[Optional[Scored]] = [None] * len(seqs)
    rows_of: dict[tuple[int, ...], list[int]] = {}  # distinct input -> the sequences that have it
    for i, seq in enumerate(seqs):
        rows_of.setdefault(tuple(seq[:-1]), []).append(i)
    inputs = sorted(rows_of, key=len, reverse=True)  # longest first: similar lengths together
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        T = len(chunk[0])
        assert 1 <= T <= block, "callers cut sequences to the context (gpt.harness: from the left)"
        idx = torch.zeros(len(chunk), T, dtype=torch.long)
        for r, x in enumerate(chunk):
            idx[r, : len(x)] = torch.tensor(x, dtype=torch.long)
        logp = F.log_softmax(model(idx.to(device)).logits.float(), dim=-1)  # (B, T, V) on the device
        for r, x in enumerate(chunk):
            rowp = logp[r, : len(x)]
            greedy = rowp.argmax(-1).cpu()
            tops = rowp.topk(min(top, rowp.size(-1)), dim=-1) if top else None
            for i in rows_of[x]:
                targets = torch.tensor(seqs[i][1:], dtype=torch.long, device=rowp.device)
                scored = Scored(rowp.gather(-1, targets[:, None]).squeeze(-1).cpu(), greedy)
                if tops is not None:
                    scored.top_logprobs, scored.top_ids = tops.values.cpu(), tops.indices.cpu()
                out[i] = scored
    return out
