"""The `logprobs` in the server's answers (gpt/serve.py), built from the numbers the engine records for sampled
tokens and gpt/scoring.py gives for a prompt: the completions API's legacy object (`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`) and the chat API's (`content`: `token`, `logprob`, `bytes`, `top_logprobs`). Also how
a token is spelled there: its text, or, for a piece of a character (byte-level BPE), OpenAI's `bytes:\\xNN`.
Docs: docs/serve.md (Logprobs and echo)."""

from __future__ import annotations

import codecs
import json
from typing import Optional

from gpt.scoring import Scored
from gpt.tokenizer import Tokenizer

# One scored token: its id, its logprob (None: a prompt's first token, which nothing predicts), the ids of the
# likeliest tokens at its position (most likely first) and their logprobs.
Entry = tuple[int, Optional[float], list[int], list[float]]

FLOOR = -9999.0  # JSON has no -inf: a logprob below this is reported as this (as vLLM does)


def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE spells each byte as one printable character; this maps them back."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    cs = list(bs)
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)  # 188 printable bytes keep their own character; the rest go from 256 up
    return {chr(c): b for b, c in zip(bs, cs)}


class Spelling:
    """How each token of a tokenizer reads: `text(id)` its UTF-8 bytes in the text (b"" for special tokens, which
    the text leaves out), `token(id)` the string the API shows, `bytes(id)` chat's `bytes`. Cached per id."""

    def __init__(self, tokenizer: Tokenizer):
        spec = json.loads(tokenizer.to_str())
        self.hf = tokenizer.hf
        self.byte_level = '"ByteLevel"' in json.dumps([spec.get("decoder"), spec.get("pre_tokenizer")])
        self.fallback = bool((spec.get("model") or {}).get("byte_fallback"))
        self.special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        self.bytemap = gpt2_byte_decoder() if self.byte_level else {}
        self.cache: dict[int, tuple[bytes, str]] = {}

    def spell(self, i: int) -> tuple[bytes, str]:
        if i not in self.cache:
            piece = self.hf.id_to_token(i) or ""
            if i in self.special:
                self.cache[i] = (b"", piece)
                return self.cache[i]
            if self.byte_level and all(c in self.bytemap for c in piece):
                raw = bytes(self.bytemap[c] for c in piece)
            elif self.fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                raw = bytes([int(piece[3:5], 16)])
            else:
                raw = piece.replace("\u2581", " ").encode("utf-8")
            try:
                shown = raw.decode("utf-8")
            except UnicodeDecodeError:  # part of a character: OpenAI's spelling of raw bytes
                shown = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            self.cache[i] = (raw, shown)
        return self.cache[i]

    def text(self, i: int) -> bytes:
        return self.spell(i)[0]

    def token(self, i: int) -> str:
        return self.spell(i)[1]

    def bytes(self, i: int) -> list[int]:
        raw, shown = self.spell(i)
        return list(raw or shown.encode("utf-8"))


class Offsets:
    """text_offset: where each token starts, in characters, counting from `start`. A token that ends inside a
    character (byte-level BPE) moves the count only once the character is whole."""

    def __init__(self, start: int = 0):
        self.at, self.decoder = start, codecs.getincrementaldecoder("utf-8")("replace")

    def take(self, spelling: Spelling, ids: list[int]) -> list[int]:
        out = []
        for i in ids:
            out.append(self.at)
            self.at += len(self.decoder.decode(spelling.text(i)))
        return out


def floor(x: Optional[float]) -> Optional[float]:
    return None if x is None else max(float(x), FLOOR)


def prompt_entries(ids: list[int], scored: Optional[Scored], top: int) -> list[Entry]:
    """A prompt's tokens as entries: the first has no logprob; the others' come from gpt/scoring.py."""
    entries: list[Entry] = [(ids[0], None, [], [])]
    if scored is None:  # a one-token prompt: nothing to score
        return entries
    logprobs = scored.logprobs.tolist()
    top_ids = scored.top_ids[:, :top].tolist() if top else [[]] * len(logprobs)
    top_lps = scored.top_logprobs[:, :top].tolist() if top else [[]] * len(logprobs)
    return entries + list(zip(ids[1:], logprobs, top_ids, top_lps))


def completion_logprobs(spelling: Spelling, entries: list[Entry], offsets: Offsets) -> dict:
    """The completions API's legacy object. top_logprobs: the likeliest tokens, and the token itself if it is
    not among them (as OpenAI and vLLM: up to logprobs + 1 entries); null for a prompt's first token."""
    tops = []
    for token, logprob, ids, lps in entries:
        if logprob is None:
            tops.append(None)
            continue
        top = {spelling.token(i): floor(lp) for i, lp in zip(ids, lps)}
        top.setdefault(spelling.token(token), floor(logprob))
        tops.append(top)
    return {
        "tokens": [spelling.token(e[0]) for e in entries],
        "token_logprobs": [floor(e[1]) for e in entries],
        "top_logprobs": tops,
        "text_offset": offsets.take(spelling, [e[0] for e in entries]),
    }


def chat_logprobs(spelling: Spelling, entries: list[Entry]) -> dict:
    """The chat API's object: per token its string, logprob, UTF-8 bytes and the `top_logprobs` likeliest."""

    def one(i: int, lp: float) -> dict:
        return {"token": spelling.token(i), "logprob": floor(lp), "bytes": spelling.bytes(i)}

    return {
        "content": [
            {**one(token, logprob), "top_logprobs": [one(i, lp) for i, lp in zip(ids, lps)]}
            for token, logprob, ids, lps in entries
        ]
    }


class ChoiceLogprobs:
    """The logprobs of a request's choices (choice k: prompt k // n), in pieces as a stream sends them or whole.
    `top` is None when the request asked for none; `echo`: the prompt's tokens come first (completions only)."""

    def __init__(self, spelling: Spelling, prompts: list[list[int]], texts: list[str], n: int, top, echo, chat):
        self.spelling, self.prompts, self.n = spelling, prompts, n
        self.top, self.echo, self.chat = top, echo, chat
        self.scored: list[Optional[Scored]] = [None] * len(prompts)  # per prompt, once the engine has scored them
        # text_offset counts from the start of prompt + completion (OpenAI's convention), echoed or not
        self.offsets = [Offsets(0 if echo else len(texts[k // n])) for k in range(len(prompts) * n)]

    def to_score(self) -> list[list[int]]:
        """The prompts gpt/scoring.py must score for echo (those of at least two tokens)."""
        return [p for p in self.prompts if len(p) > 1] if self.echo and self.top is not None else []

    def set_scored(self, results: list[Scored]) -> None:
        it = iter(results)
        self.scored = [next(it) if len(p) > 1 else None for p in self.prompts]

    def prompt(self, k: int) -> list[Entry]:
        i = k // self.n
        return prompt_entries(self.prompts[i], self.scored[i], self.top or 0)

    def part(self, k: int, entries: list[Entry]) -> Optional[dict]:
        """The logprobs of choice k's next tokens (a stream's chunk, or the whole choice)."""
        if self.top is None:
            return None
        if self.chat:
            return chat_logprobs(self.spelling, entries)
        return completion_logprobs(self.spelling, entries, self.offsets[k])

    def whole(self, k: int, entries: list[Entry]) -> Optional[dict]:
        return self.part(k, (self.prompt(k) if self.echo else []) + entries)
