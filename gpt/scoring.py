"""Scoring token sequences: the log-probability the model gives each token of a text, the greedy choice at each
position and the most likely alternatives. One implementation for everything that asks "how likely is this
text": lm-evaluation-harness's loglikelihood requests (gpt/harness.py) and the server's `logprobs` / `echo`
(gpt/serve.py). And a whole text's bits per byte (`python -m gpt.evaluate bpb`), in windows of the context."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from gpt.devices import autocast
from gpt.errors import GPTError
from gpt.model import GPT
from gpt.tokenizer import Tokenizer


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


def bits_per_byte(
    model, tokenizer: Tokenizer, text: str, *, stride: Optional[int] = None, batch_size: int = 8, dtype: str = "float32"
) -> dict:
    """The model's cross-entropy on `text` in bits per UTF-8 byte (and in nats per token).

    The text is read as one document: <|endoftext|> first (as after the previous document), so every token of
    the text is predicted, including the first. Windows of block_size tokens advance by `stride` (default: a
    whole block, so no token is scored twice); each token is scored once, in the first window that has it
    among its last `stride` positions, so with stride < block_size every token but the first block's sees at
    least block_size - stride tokens of context (slower: block_size / stride windows per block).
    """
    block = model.config.block_size
    stride = block if stride is None else stride  # (0 is refused below, never read as "the default")
    if not isinstance(stride, int) or isinstance(stride, bool) or not 0 < stride <= block:
        raise GPTError(f"stride must be between 1 and the model's context ({block}) (got {stride!r})")
    unknown = tokenizer.unknown_chars(text)
    if unknown:
        shown = "".join(sorted(unknown))[:20]
        raise GPTError(
            f"the text has characters the model's tokenizer has never seen ({shown!r}): it cannot score "
            "them; remove them, or score a model whose tokenizer has them (BPE has all)"
        )
    ids = tokenizer.encode(text)
    if tokenizer.eos_id is not None:
        ids = [tokenizer.eos_id] + ids
    if len(ids) < 2:
        raise GPTError("the text is empty: nothing to score")
    device = next(model.parameters()).device
    ids = torch.tensor(ids, dtype=torch.long)
    inputs, targets = ids[:-1], ids[1:]
    n = len(targets)
    width = min(block, n)
    # Window starts; the last is moved back so that every window is full (one shape: batches stack).
    starts = list(range(0, max(n - width, 0) + 1, stride))
    if starts[-1] + width < n:
        starts.append(n - width)
    windows, labels, scored_to = [], [], 0
    for s in starts:
        y = targets[s : s + width].clone()
        y[: max(0, scored_to - s)] = -100  # scored by an earlier window
        scored_to = s + width
        windows.append(inputs[s : s + width])
        labels.append(y)
    table = torch.tensor(tokenizer.byte_lengths() + [0] * (model.config.vocab_size - tokenizer.vocab_size))
    nats, n_bytes, n_tokens = 0.0, 0, 0
    model.eval()
    t0 = time.perf_counter()
    with autocast(device, dtype):
        for i in range(0, len(windows), batch_size):
            x = torch.stack(windows[i : i + batch_size]).to(device)
            y = torch.stack(labels[i : i + batch_size])
            logits = model(x).logits.float()
            nats += F.cross_entropy(
                logits.flatten(0, 1), y.flatten().to(device), ignore_index=-100, reduction="sum"
            ).item()
            kept = y[y != -100]
            n_tokens += kept.numel()
            n_bytes += int(table[kept].sum())
    seconds = time.perf_counter() - t0
    if n_bytes == 0:
        raise GPTError("the text's tokens stand for no bytes (special tokens only): nothing to score in bits per byte")
    return {
        "bpb": nats / n_bytes / math.log(2),
        "loss": nats / n_tokens,
        "tokens": n_tokens,
        "bytes": n_bytes,
        "bytes_per_token": n_bytes / n_tokens,
        "text_bytes": len(text.encode("utf-8")),
        "context": block,
        "stride": stride,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(n_tokens / max(seconds, 1e-9), 1),
    }
