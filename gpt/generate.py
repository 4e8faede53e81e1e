"""Decoding: turn a model's next-token logits into tokens. Sampling (temperature, top-k, top-p), greedy,
beam search, n-gram blocking, and the generation loop over the KV cache (prompt in one pass, then one
fixed-shape `GPT.decode_step` per token; `compile=True` runs that step through torch.compile, see
gpt/fastdecode.py). Works on token ids; gpt/completions.py turns text into prompts and tokens into text.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from gpt.errors import GPTError, is_int, is_number
from gpt.fastdecode import compiled_decode_step
from gpt.model import GPT


@torch.no_grad()
def generate(
    model: GPT,
    idx,
    max_new_tokens: int,
    *,
    attention_mask=None,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_token_id: Optional[int] = None,
    generator=None,
    on_context_full: str = "slide",
    on_token: Optional[Callable[[torch.Tensor], object]] = None,
    no_repeat_ngram_size: int = 0,
    logit_bias: Optional[torch.Tensor] = None,
    compile: bool = False,
) -> torch.Tensor:
    """Continue each row of idx (B, T) by up to max_new_tokens tokens; returns the new tokens (B, n).

    Batches of different-length prompts are left-padded with attention_mask marking real tokens.
    temperature 0 is greedy decoding. Rows that produced `eos_token_id` are filled with it afterwards,
    and generation ends when every row has. When the context (block_size) is full: "stop" ends
    generation there; "slide" keeps the most recent 3/4 of the context, re-encodes it in one pass
    and goes on (what nanoGPT's crop-to-block_size does, without recomputing on every token).
    on_token(new_tokens) may return True (stop now) or a (B,) bool tensor (these rows are done).
    no_repeat_ngram_size n > 0: never generate an n-gram that the row has already generated (the
    prompt does not count, so copying from it stays possible); breaks greedy repetition loops.
    logit_bias (B, V) is added to every step's logits (e.g. a bonus for the words of each row's input).
    generator: a torch.Generator for the batch, or a list of B (each row its own random stream).
    The prompt is read in one pass; each new token then takes one fixed-shape decode_step, compiled
    with compile=True (worth its one-off compilation time when many tokens are generated).
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    if not isinstance(no_repeat_ngram_size, int) or no_repeat_ngram_size < 0:
        raise GPTError(f"no_repeat_ngram_size must be an integer >= 0 (got {no_repeat_ngram_size!r}); 0 = off")
    if on_context_full not in ("slide", "stop"):
        raise GPTError(f"on_context_full must be 'slide' or 'stop' (got {on_context_full!r})")
    B, T = idx.shape
    block = model.config.block_size
    if T > block:
        raise prompt_too_long(T, block)
    if T == 0:
        raise GPTError("prompt is empty: give at least one token (e.g. a newline)")
    # All tokens (prompt + generated) live in one buffer: sliding needs the recent ones. It starts at a
    # context's worth and doubles as tokens come, so max_new_tokens (which EOS, a stop string or the full
    # context may cut short, and which may be huge) is never allocated up front.
    tokens = idx.new_empty(B, T + min(max_new_tokens, max(block, 256)))
    tokens[:, :T] = idx
    real = None
    if attention_mask is not None:
        real = torch.ones(B, tokens.size(1), dtype=torch.bool, device=idx.device)
        real[:, :T] = attention_mask.bool()
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)

    cache = model.new_cache()
    logits = model(idx, attention_mask=attention_mask, cache=cache, only_last=True).logits[:, -1]
    cache.start_decoding()
    decode_step = compiled_decode_step(model) if compile else GPT.decode_step
    # Compiled: Dynamo checks its guards (model, shapes, dtypes) on the first decode step; the later steps
    # of this loop change none of them, so they skip the check (~0.1 ms per token). (set_stance takes
    # effect when called, so each step calls it in its `with`; eager decoding never loads Dynamo.)
    guards = contextlib.nullcontext
    skip_guards = functools.partial(torch.compiler.set_stance, skip_guard_eval_unsafe=True) if compile else guards
    n = T
    for step in range(max_new_tokens):
        if logit_bias is not None:
            logits = logits + logit_bias
        if no_repeat_ngram_size:
            logits = ban_repeated_ngrams(logits, tokens[:, T:n], no_repeat_ngram_size)
        nxt = sample_next_token(logits, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
            finished |= nxt == eos_token_id
        if n == tokens.size(1):
            more = min(tokens.size(1), T + max_new_tokens - n)
            tokens = torch.cat([tokens, tokens.new_empty(B, more)], dim=1)
            if real is not None:
                real = torch.cat([real, real.new_ones(B, more)], dim=1)
        tokens[:, n] = nxt
        n += 1
        if on_token is not None:  # True: stop now; a (B,) bool tensor: these rows are done
            stop = on_token(nxt)
            if stop is True:
                break
            if isinstance(stop, torch.Tensor):
                finished |= stop
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        if cache.length < block:
            with guards():
                logits = decode_step(model, nxt[:, None], cache)
            guards = skip_guards
            cache.length += 1
        elif on_context_full == "stop":
            break
        else:
            keep = max(1, (3 * block) // 4)
            cache.reset()
            window_mask = None if real is None else real[:, n - keep : n]
            logits = model(tokens[:, n - keep : n], attention_mask=window_mask, cache=cache, only_last=True).logits[
                :, -1
            ]
            cache.start_decoding()
    return tokens[:, T:n]


@torch.no_grad()
def beam_search(
    model: GPT,
    idx,
    max_new_tokens: int,
    *,
    num_beams: int,
    eos_token_id: int,
    attention_mask=None,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    logit_bias: Optional[torch.Tensor] = None,
    stop_token_ids: Sequence[int] = (),
    num_return_sequences: int = 1,
) -> torch.Tensor:
    """The most likely continuation of each row of idx (B, T) found by beam search; returns (B, n) new
    tokens, padded with eos_token_id after the end. num_return_sequences R > 1: the R best of each row, best
    first, as rows b*R .. b*R + R-1 of (B*R, n) (the n-best list that minimum Bayes-risk decoding chooses from).

    Each row keeps `num_beams` partial continuations. At every step all beams of a row are extended
    by every token; the `num_beams` best (by summed log-probability) survive, and the KV cache rows
    follow them. A beam that emits EOS is finished and scored by log-probability / length**length_penalty
    (so longer outputs are not penalised just for having more terms). A row stops once it holds
    `num_beams` finished continuations and its best running beam, scored as if it ended now, is no better
    than the best finished one; the best one wins. num_beams=1 is greedy decoding.
    A token of `stop_token_ids` (e.g. one that contains a stop string) also finishes a beam, and is kept.
    """
    check_sampling_args(max_new_tokens, 0.0)
    if not isinstance(num_beams, int) or num_beams < 1:
        raise GPTError(f"num_beams must be a positive integer (got {num_beams!r}); 1 = greedy")
    if not is_int(num_return_sequences) or not 1 <= num_return_sequences <= num_beams:
        raise GPTError(f"num_return_sequences must be 1..num_beams={num_beams} (got {num_return_sequences!r})")
    B, T = idx.shape
    K, block = num_beams, model.config.block_size
    if T > block:
        raise prompt_too_long(T, block)
    max_new_tokens = min(max_new_tokens, block - T + 1)  # the last new token is predicted, never fed back
    rows = torch.arange(B, device=idx.device).repeat_interleave(K)  # beam b*K + k belongs to row b
    cache = model.new_cache()
    mask = attention_mask[rows] if attention_mask is not None else None
    logits = model(idx[rows], attention_mask=mask, cache=cache, only_last=True).logits[:, -1]
    scores = torch.zeros(B, K, device=idx.device)
    scores[:, 1:] = float("-inf")  # all beams start identical: let only the first one expand at step 0
    tokens = idx.new_full((B * K, max_new_tokens), eos_token_id)
    finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(B)]
    active = [True] * B
    written = 0  # generated positions filled in `tokens`
    bias = logit_bias[rows] if logit_bias is not None else None
    ends = set(stop_token_ids)
    for step in range(max_new_tokens):
        if bias is not None:
            logits = logits + bias
        if no_repeat_ngram_size:
            logits = ban_repeated_ngrams(logits, tokens[:, :step], no_repeat_ngram_size)
        logp = F.log_softmax(logits.float(), dim=-1)  # (B*K, V)
        V = logp.size(-1)
        cand = (scores.view(-1, 1) + logp).view(B, K * V)
        top_scores, top = cand.topk(2 * K, dim=-1)  # 2K: up to K of them may end in EOS
        next_beam = torch.zeros(B, K, dtype=torch.long, device=idx.device)
        next_token = torch.full((B, K), eos_token_id, dtype=torch.long, device=idx.device)
        next_scores = torch.full((B, K), float("-inf"), device=idx.device)
        for b in range(B):
            if not active[b]:
                continue
            kept = 0
            for score, flat in zip(top_scores[b].tolist(), top[b].tolist()):
                beam, token = divmod(flat, V)
                if score == float("-inf"):
                    break
                if token == eos_token_id or token in ends:  # a finished continuation
                    seq = tokens[b * K + beam, :step].clone()
                    if token != eos_token_id:  # a stop token is part of the text
                        seq = torch.cat([seq, seq.new_tensor([token])])
                    finished[b].append((score / max(1, step + 1) ** length_penalty, seq))
                else:
                    next_beam[b, kept], next_token[b, kept], next_scores[b, kept] = beam, token, score
                    kept += 1
                if kept == K:
                    break
            # Done when no running beam, were it to end now, would beat the best finished one (transformers'
            # early_stopping=False rule): stopping at the first K finished ones would favour short outputs.
            if kept == 0 or (
                len(finished[b]) >= K
                and max(f[0] for f in finished[b]) >= next_scores[b, 0].item() / (step + 1) ** length_penalty
            ):
                active[b] = False
        src = (torch.arange(B, device=idx.device)[:, None] * K + next_beam).view(-1)
        tokens = tokens[src]
        tokens[:, step] = next_token.view(-1)
        written, scores = step + 1, next_scores
        if not any(active) or step == max_new_tokens - 1:
            break
        cache.reorder(src)
        logits = model(next_token.view(-1, 1), cache=cache, only_last=True).logits[:, -1]

    R = num_return_sequences
    out = idx.new_full((B * R, max_new_tokens), eos_token_id)
    for b in range(B):
        if active[b]:  # max_new_tokens ran out: the running beams compete with the finished ones, scored alike
            finished[b] += [
                (score / max(1, written) ** length_penalty, tokens[b * K + k, :written])
                for k, score in enumerate(scores[b].tolist())
                if score != float("-inf")
            ]
        ranked = sorted(finished[b], key=lambda hyp: hyp[0], reverse=True)  # stable: of equals, the first found
        for r in range(R):  # (a row with fewer than R hypotheses repeats its last one)
            seq = ranked[min(r, len(ranked) - 1)][1]
            out[b * R + r, : len(seq)] = seq
    return out


def ban_repeated_ngrams(logits: torch.Tensor, generated: torch.Tensor, n: int) -> torch.Tensor:
    """-inf for each token that would complete an n-gram already in its row of `generated` (B, L)."""
    B, L = generated.shape
    if L < n:
        return logits
    ngrams = generated.unfold(1, n, 1)  # (B, L - n + 1, n): every n-gram so far
    last = generated[:, L - n + 1 :]  # (B, n - 1): what the next token would extend
    seen = (ngrams[:, :, :-1] == last[:, None, :]).all(-1)  # n-grams that start the same way
    rows, at = seen.nonzero(as_tuple=True)
    logits = logits.clone()
    logits[rows, ngrams[rows, at, -1]] = float("-inf")
    return logits


def prompt_too_long(n_tokens: int, block_size: int, which: str = "prompt") -> GPTError:
    return GPTError(f"{which} is {n_tokens} tokens but the model's context is {block_size}: shorten the prompt")


def check_sampling_args(max_new_tokens, temperature, top_k=None, top_p=None, prefix: str = ""):
    """prefix: where the settings live in the config (e.g. "log_samples."), for the messages."""
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise GPTError(f"{prefix}max_new_tokens must be a positive integer (got {max_new_tokens!r})")
    if not is_number(temperature) or not 0 <= temperature < math.inf:
        raise GPTError(f"{prefix}temperature must be a number >= 0 (got {temperature!r}); use 0 for greedy decoding")
    if top_k is not None and (not is_int(top_k) or top_k <= 0):
        raise GPTError(f"{prefix}top_k must be a positive integer or null (got {top_k!r})")
    if top_p is not None and not (is_number(top_p) and 0.0 < top_p <= 1.0):
        raise GPTError(f"{prefix}top_p must be in (0, 1] or null (got {top_p!r})")


def scale_by_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature, exact for every temperature > 0, however small. Dividing the logits themselves by
    a tiny one (1e-300, which float32 rounds to 0) makes inf - inf = NaN in the softmax; so the row's largest
    logit is subtracted first and stays 0 (the top token keeps weight 1), and the others go to -inf, never NaN:
    a tiny temperature is greedy decoding. NaN logits (broken weights) stay NaN and are refused by the caller."""
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    return torch.where(shifted == 0, shifted, shifted / temperature)  # 0 / (a temperature that is 0 in float32)


@dataclass
class Penalties:
    """Per-row adjustments of (B, vocab) next-token logits, for sample_next_token: each row its own values (a
    neutral row, 0 / 1 / no bias, keeps its logits bit for bit). In vLLM's order: `bias` (B, vocab) is added
    (OpenAI's logit_bias); `repetition` (B,) divides the positive and multiplies the negative logits of the tokens
    `seen` (B, vocab, bool) in the row's prompt or output (HF's and vLLM's repetition_penalty); then OpenAI's
    penalties over the row's generated tokens, `counts` (B, vocab): logits[j] -= counts[j] * frequency +
    (counts[j] > 0) * presence. A field left None is not applied (no row of the batch uses it)."""

    bias: Optional[torch.Tensor] = None
    seen: Optional[torch.Tensor] = None
    repetition: Optional[torch.Tensor] = None
    counts: Optional[torch.Tensor] = None
    frequency: Optional[torch.Tensor] = None
    presence: Optional[torch.Tensor] = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.bias is not None:
            logits = logits + self.bias
        if self.seen is not None:
            r = self.repetition[:, None]
            # zeros are left alone (0 * a penalty that overflowed to inf would be NaN), and whatever a huge or tiny
            # penalty sends to +-inf stays at float32's largest magnitude: every accepted value samples. (NaN
            # logits, broken weights, stay NaN and are refused below.)
            scaled = torch.where(logits > 0, logits / r, torch.where(logits < 0, logits * r, logits))
            big = torch.finfo(torch.float32).max
            logits = torch.where(self.seen, scaled.clamp(-big, big), logits)
        if self.counts is not None:
            logits = logits - self.counts * self.frequency[:, None] - (self.counts > 0) * self.presence[:, None]
        return logits


def sample_next_token(
    logits, temperature=1.0, top_k=None, top_p=None, generator=None, min_p=None, penalties=None
) -> torch.Tensor:
    """One token per row from (B, vocab) logits. Greedy at temperature 0.

    `penalties` (Penalties: per row) adjust the logits first, so greedy decoding sees them too. Then temperature,
    top-k, top-p and min-p (a token stays if its probability is at least min_p times the likeliest one's, as in
    HF and vLLM). top-k uses `topk` (no full sort); top-p sorts only when asked, and only the top-k survivors if
    both are given. `generator`: one for the batch, or a list of B (each row its own random stream).
    """
    if penalties is not None:
        logits = penalties(logits)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = scale_by_temperature(logits.float(), temperature)
    candidates = None  # token ids the (sorted) logits refer to, when filtered
    if top_k is not None and top_k < logits.size(-1):
        logits, candidates = torch.topk(logits, top_k, dim=-1)  # sorted, descending
    if top_p is not None and top_p < 1.0:
        if candidates is None:
            logits, candidates = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(logits, dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p. The first always stays, said
        # outright: a top_p below float32's resolution (1e-300 is 0 there) would otherwise drop every token.
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p:
        # p >= min_p * p_max, in logits (after temperature: scale_by_temperature made the largest one 0). The
        # likeliest token always stays; log(1e-300) is finite in float64, -690.
        logits = logits.masked_fill(logits < logits.max(dim=-1, keepdim=True).values + math.log(min_p), float("-inf"))
    try:
        probs = F.softmax(logits, dim=-1)
        if isinstance(generator, (list, tuple)):
            choice = torch.cat([torch.multinomial(probs[i : i + 1], 1, generator=g) for i, g in enumerate(generator)])
        else:
            choice = torch.multinomial(probs, 1, generator=generator)
        choice = choice.squeeze(-1)
    except RuntimeError as e:  # NaN/Inf logits: the weights themselves are broken
        if "probability tensor" not in str(e):
            raise
        raise GPTError(
            "the model's next-token probabilities are NaN or Inf: its weights hold NaN/Inf, or values so "
            "large that the logits overflow (a diverged run?); sample from another checkpoint, e.g. the "
            "run's checkpoints/best"
        ) from None
    return choice if candidates is None else candidates.gather(-1, choice[:, None]).squeeze(-1)
