"""Text in, text out: prompts encoded (and left-padded into batches), stop strings, streaming printing,
escaping for line-per-prompt files, and `generate_batch`, which completes many prompts at once over the KV
cache (gpt/generate.py decodes the tokens). Used by sample.py, fine-tuning's scoring and training samples.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence, TextIO

import torch

from gpt.devices import check_dtype
from gpt.errors import GPTError, is_int, is_number
from gpt.generate import beam_search, generate, prompt_too_long
from gpt.model import GPT
from gpt.tokenizer import Tokenizer


def unescape(line: str) -> str:
    return line.replace("\\n", "\n").replace("\\t", "\t")


def escape(text: str) -> str:
    """One output line: a line break inside the text is written as \\n (\\r), which keeps line N of the
    output the completion of line N of the input for every line reader."""
    return text.replace("\n", "\\n").replace("\r", "\\r")


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """text up to the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class StreamPrinter:
    """Prints a single sample as its tokens arrive; says stop when a stop string appears.

    Decodes the whole continuation each time (byte-level BPE pieces may be half a character) and holds
    back what could still turn out to be the start of a stop string.
    """

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str], out: TextIO):
        self.tokenizer, self.stops, self.out = tokenizer, [s for s in stops if s], out
        self.ids: list[int] = []
        self.printed = 0
        self.holdback = max((len(s) for s in self.stops), default=1) - 1

    def __call__(self, token: torch.Tensor) -> bool:
        self.ids.append(int(token[0]))
        text = self.tokenizer.decode(self.ids)
        text, stopped = cut_at_stop(text, self.stops)
        # Not yet stopped: an incomplete UTF-8 sequence at the end (decoded as U+FFFD) waits for the rest, and
        # the complete text before it holds back what could begin a stop string.
        end = len(text) if stopped else len(text.rstrip("\ufffd")) - self.holdback
        if end > self.printed:
            self.out.write(text[self.printed : end])
            self.out.flush()
            self.printed = end
        return stopped

    def finish(self) -> str:
        text, _ = cut_at_stop(self.tokenizer.decode(self.ids), self.stops)
        self.out.write(text[self.printed :])
        self.out.flush()
        return text


def encode_prompt(tokenizer: Tokenizer, prompt: str, strict: bool = True) -> list[int]:
    ids = tokenizer.encode(prompt, strict=strict)
    if not ids:  # an empty prompt starts a fresh document
        if tokenizer.eos_id is None:
            raise GPTError("the prompt is empty and the tokenizer has no end-of-text token; give a prompt")
        ids = [tokenizer.eos_id]
    return ids


def left_pad(batch: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(B, T) ids with shorter prompts padded on the left, and the mask of real tokens (None if no padding)."""
    T = max(len(ids) for ids in batch)
    idx = torch.full((len(batch), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.bool)
    for i, ids in enumerate(batch):
        idx[i, T - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[i, T - len(ids) :] = True
    return idx.to(device), (None if bool(mask.all()) else mask.to(device))


class StopStrings:
    """For `generate(on_token=...)` on a batch: marks the rows whose continuation contains a stop string,
    so generation ends once every row has stopped (the text after the stop is cut off later)."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str], batch_size: int):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.ids: list[list[int]] = [[] for _ in range(batch_size)]
        self.done = torch.zeros(batch_size, dtype=torch.bool)
        # a stop string of n characters lies within the last 4n + 1 tokens (a token is at least one byte)
        self.window = 4 * max((len(s) for s in self.stops), default=0) + 1

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        for row, token in enumerate(tokens.tolist()):
            if not self.done[row]:
                self.ids[row].append(token)
                tail = self.tokenizer.decode(self.ids[row][-self.window :])
                self.done[row] = any(s in tail for s in self.stops)
        return self.done.to(tokens.device)


def source_token_bias(
    tokenizer: Tokenizer, texts: Sequence[str], vocab_size: int, bonus: float, device
) -> torch.Tensor:
    """(B, V): `bonus` at the tokens of each text, 0 elsewhere. Each text is encoded as it is and after a
    space, because a byte-level BPE spells a word differently at the start of a text and after a space."""
    bias = torch.zeros(len(texts), vocab_size, device=device)
    for row, ids in enumerate(tokenizer.encode_batch([t for text in texts for t in (text, " " + text)])):
        bias[row // 2, ids] = bonus
    return bias


def check_decoding(
    num_beams=1, no_repeat_ngram_size=0, copy_bonus=0.0, length_penalty=1.0, dtype="auto", prefix: str = ""
) -> None:
    """The decoding settings sample.py and fine-tuning's evaluation share (`prefix`: "eval." for the latter)."""
    check_dtype(dtype, prefix)
    if not is_number(length_penalty) or not math.isfinite(length_penalty):
        raise GPTError(
            f"{prefix}length_penalty must be a finite number (got {length_penalty!r}); 1.0 = scores "
            "divided by the length, 0 = plain sums"
        )
    if not is_int(num_beams) or num_beams < 1:
        raise GPTError(f"{prefix}num_beams must be a positive integer (got {num_beams!r}); 1 = greedy")
    if not is_int(no_repeat_ngram_size) or no_repeat_ngram_size < 0:
        raise GPTError(f"{prefix}no_repeat_ngram_size must be an integer >= 0 (got {no_repeat_ngram_size!r}); 0 = off")
    if not is_number(copy_bonus) or not 0 <= copy_bonus < math.inf:
        raise GPTError(f"{prefix}copy_bonus must be >= 0 (got {copy_bonus!r}); 0 = off")


def check_stop_strings(stops, key: str) -> None:
    if isinstance(stops, (str, bytes)) or not hasattr(stops, "__iter__"):
        raise GPTError(f"{key} must be a list of strings, e.g. {key}=['\\n\\n'] (got {stops!r})")
    if any(not str(s) for s in stops):
        raise GPTError(f"{key} holds an empty string, which would end every text at once; drop it ({key}=[] for none)")


def generate_batch(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k=None,
    top_p=None,
    stops: Sequence[str] = (),
    stop_at_eos=True,
    batch_size: int = 32,
    generator=None,
    on_context_full="slide",
    no_repeat_ngram_size: int = 0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    copy_bonus: float = 0.0,
    sources: Optional[Sequence[str]] = None,
    compile: bool = False,
    strict: bool = True,
    num_return_sequences: int = 1,
) -> list[str]:
    """Completions for many prompts, batched (sorted by length so batches carry little padding).
    Sampling (temperature > 0) draws prompt i's tokens from its own random stream, seeded by the generator's
    seed and i: a completion does not depend on batch_size or on the other prompts.
    num_beams > 1: beam search (deterministic: needs temperature=0 and the EOS token).
    copy_bonus > 0: add it to the logits of the tokens of each prompt's source text (`sources`, e.g. the
    line a task template wraps; default the prompt itself), so words are carried over more readily: for
    tasks whose output mostly repeats the input (style transfer, correction).
    strict=False: characters a char-level tokenizer lacks become <|unk|> (as in training) instead of an error.
    num_return_sequences R > 1 (beam search): the R best texts of each prompt, best first, R per prompt in turn."""
    check_decoding(num_beams, no_repeat_ngram_size, copy_bonus, length_penalty)
    R = num_return_sequences
    if R > 1 and R > num_beams:
        raise GPTError(f"num_return_sequences={R} needs num_beams >= {R}: they are the beams' best texts")
    if sources is not None and len(sources) != len(prompts):
        raise ValueError("one source text per prompt")
    if num_beams > 1 and (temperature != 0 or not stop_at_eos or tokenizer.eos_id is None):
        raise GPTError(
            f"beam search (num_beams={num_beams}) finds the most likely text: it needs temperature=0 "
            "and stop_at_eos=true; or use num_beams=1 to sample"
        )
    device = next(model.parameters()).device
    encoded = []
    for i, prompt in enumerate(prompts):  # every prompt checked before any batch runs; a bad one named by its line
        line = f"prompt {i + 1} (line {i + 1} of a batch input)" if len(prompts) > 1 else "prompt"
        try:
            encoded.append(encode_prompt(tokenizer, prompt, strict))
        except GPTError as e:
            raise GPTError(f"{line}: {e}" if len(prompts) > 1 else str(e)) from None
        if len(encoded[-1]) > model.config.block_size:
            raise prompt_too_long(len(encoded[-1]), model.config.block_size, line)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[Optional[str]] = [None] * (len(prompts) * R)
    pad = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    # Beam search ends a beam at a token that holds a stop string (the text is cut there below).
    stop_ids = (
        [i for i in range(tokenizer.vocab_size) if any(s in tokenizer.decode([i]) for s in stops)]
        if num_beams > 1 and stops
        else []
    )
    chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    # The context fills by the padded length: a prompt padded beside longer ones would reach it (and slide,
    # stop, or end its beams) sooner than alone. Batches that can reach it are split into runs of prompts of
    # one length (the chunk is sorted by length): those need no padding.
    chunks = [
        part
        for chunk in chunks
        for part in (
            [list(same) for _, same in itertools.groupby(chunk, key=lambda i: len(encoded[i]))]
            if max(len(encoded[i]) for i in chunk) + max_new_tokens > model.config.block_size
            else [chunk]
        )
    ]
    for chunk in chunks:
        idx, mask = left_pad([encoded[i] for i in chunk], pad, device)
        bias = None
        if copy_bonus:
            texts = [(sources or prompts)[i] for i in chunk]
            bias = source_token_bias(tokenizer, texts, model.config.vocab_size, copy_bonus, device)
        if num_beams > 1:
            new = beam_search(
                model,
                idx,
                max_new_tokens,
                num_beams=num_beams,
                eos_token_id=tokenizer.eos_id,
                attention_mask=mask,
                length_penalty=length_penalty,
                no_repeat_ngram_size=no_repeat_ngram_size,
                logit_bias=bias,
                stop_token_ids=stop_ids,
                num_return_sequences=R,
            )
        else:
            rows = (
                None
                if generator is None or temperature == 0
                else [
                    torch.Generator(device=generator.device).manual_seed(
                        (generator.initial_seed() * 1_000_003 + i) % 2**63
                    )
                    for i in chunk
                ]
            )
            new = generate(
                model,
                idx,
                max_new_tokens,
                attention_mask=mask,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                eos_token_id=tokenizer.eos_id if stop_at_eos else None,
                generator=rows,
                on_context_full=on_context_full,
                on_token=StopStrings(tokenizer, stops, len(chunk)) if stops else None,
                no_repeat_ngram_size=no_repeat_ngram_size,
                logit_bias=bias,
                compile=compile,
            )
        for row, i in enumerate(chunk):
            for r in range(R):
                out[i * R + r] = cut_at_stop(tokenizer.decode(new[row * R + r].tolist()), stops)[0]
    return out
