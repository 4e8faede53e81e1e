"""The serving engine: one thread owns the model and decodes every running request together (continuous batching).
Requests that arrive within `batch_window_ms` of each other are read (prefilled) together, left-padded; every step
then samples one token for every running request (each with its own temperature, top_k, top_p, min_p, penalties,
logit_bias, random stream, stop strings and max_tokens) and runs one decode step over the whole batch. A request
that finishes leaves the batch and a waiting one joins it at the next step, without draining the others: the
batch's KV cache is re-gathered (gpt/kvrows.py), each row's cached positions packed to the right (a row's
positions are counted per row, cache.seen, so where a key sits in the buffer does not matter, only the mask of
real positions, as with left padding). A failure stays with its request: sampling or reading a prompt that fails
fails only those jobs; only the batch's decode step (the model itself) fails the batch. A cancelled job leaves the
batch at the next step, and the queue at once, with every other cancelled one. A job that asks for logprobs
records, for every token it samples, the model's raw log-softmax at that step (before penalties, logit_bias,
temperature, top_k, top_p and min_p, as vLLM reports by default). With a prefix cache (gpt/prefixcache.py) a
prompt is read from the end of its longest cached prefix, and every prompt read and every finished text leaves its
keys and values there for the prompts after it. Prompts to score (`Score`: echo's prompt logprobs) go through the
same queue and run, by gpt/scoring.py, on this thread between two steps. The HTTP side is gpt/serve.py.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Optional

import torch

from gpt.completions import StreamPrinter, left_pad
from gpt.errors import GPTError
from gpt.generate import Penalties, sample_next_token
from gpt.kvrows import pack_rows, reader, start_from_blocks
from gpt.model import GPT, KVCache
from gpt.prefixcache import PrefixCache
from gpt.scoring import score_sequences

# ----------------------------------------------------------------------------------------------------
# The engine: one thread, one model, one batch


@dataclass(eq=False)
class Job:
    """One completion (one of a request's `n` choices) and the way back to its request."""

    ids: list[int]  # the prompt's tokens
    max_tokens: int
    temperature: float
    top_p: Optional[float]
    stops: list[str]
    generator: Optional[torch.Generator]
    send: object  # send(event): hands an event to the request's event loop (thread-safe)
    cancelled: bool = False  # set by the request when its client went away
    generated: list[int] = field(default_factory=list)
    cached: int = 0  # this row's positions in the KV cache
    printer: Optional[StreamPrinter] = None
    logprobs: Optional[int] = None  # record each sampled token's logprob and this many likeliest (None: nothing)
    scores: list = field(default_factory=list)  # per sampled token: (id, logprob, top ids, top logprobs)
    reported: int = 0  # the scores sent with "delta" events so far
    reused: int = 0  # the prompt's tokens taken from the prefix cache, not computed
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    frequency_penalty: float = 0.0  # OpenAI's, over the generated tokens
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0  # HF's / vLLM's, over the prompt's and the generated tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    # What the penalties need, made at admission for a job that has any (None: not used): each token's count in
    # the generated tokens, whether it is in the prompt or the output, the bias as a (vocab,) row.
    counts: Optional[torch.Tensor] = None
    seen: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None

    def write(self, text: str) -> None:  # StreamPrinter's output: the new text (and its tokens' scores) go out
        if text:
            self.send(("delta", text, self.scores[self.reported :]))
            self.reported = len(self.scores)

    def flush(self) -> None:
        pass


@dataclass(eq=False)
class Score:
    """Sequences to score with gpt/scoring.py on the engine's thread, between two steps (echo's prompts)."""

    seqs: list[list[int]]
    top: int
    send: object  # send(("scored", [Scored, ...])) or send(("error", message))
    cancelled: bool = False

    def flush(self) -> None:
        pass


class Engine:
    """Owns the model; runs the batch (see the module's docstring). `submit` may be called from any thread."""

    def __init__(
        self,
        model: GPT,
        tokenizer,
        *,
        stop_at_eos=True,
        max_batch_size=16,
        batch_window_s=0.005,
        prefix_cache: Optional[PrefixCache] = None,
    ):
        self.model, self.tokenizer, self.prefix_cache = model, tokenizer, prefix_cache
        self.eos = tokenizer.eos_id if stop_at_eos else None
        self.pad = tokenizer.eos_id if tokenizer.eos_id is not None else 0
        self.max_batch_size, self.window = max_batch_size, batch_window_s
        self.block = model.config.block_size
        self.device = next(model.parameters()).device
        self.waiting: "queue.Queue[Job | Score]" = queue.Queue()
        self.purge = threading.Event()  # set when a request cancels: drop its jobs from the queue at the next step
        self.rows: list[Job] = []  # the running batch, in the cache's row order
        self.cache: Optional[KVCache] = None
        self.logits: Optional[torch.Tensor] = None  # (rows, vocab): each row's next-token logits
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="gpt-engine", daemon=True)

    def submit(self, jobs: list[Job]) -> None:
        for job in jobs:
            self.waiting.put(job)

    def cancel(self, jobs: list[Job]) -> None:
        """The request is gone (any thread): its running rows leave at the next step, its waiting jobs are
        dropped from the queue then, all at once, however full the batch is."""
        for job in jobs:
            job.cancelled = True
        self.purge.set()

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        self.thread.join(timeout)
        for job in self.rows + self.drain():  # whatever is left (after uvicorn's bounded wait)
            job.send(("error", "the server is shutting down"))

    def drain(self) -> list[Job]:
        jobs = []
        with contextlib.suppress(queue.Empty):
            while True:
                jobs.append(self.waiting.get_nowait())
        return jobs

    def run(self) -> None:
        with torch.inference_mode():
            while not self.stopping.is_set():
                try:
                    self.step()
                except Exception as e:  # model-wide (the decode step, a bug): fail the batch, keep serving
                    message = failure(e)
                    for job in self.rows:
                        job.send(("error", message))
                    self.rows, self.cache, self.logits = [], None, None

    def take_waiting(self) -> tuple[list[Job], list[Score]]:
        """New jobs for the free rows, and every waiting Score. An idle engine waits for one, then for the batch
        window, so that requests arriving together start together. Cancelled jobs are dropped as they come, not
        counted: a queue of abandoned jobs drains in one step, without a batch window each."""
        if self.purge.is_set():  # a request was cancelled: its jobs leave the queue even when no row is free
            self.purge.clear()
            with self.waiting.mutex:
                live = [job for job in self.waiting.queue if not job.cancelled]
                self.waiting.queue.clear()
                self.waiting.queue.extend(live)
        jobs, scores = [], []

        def take(item):
            if not item.cancelled:
                (scores if isinstance(item, Score) else jobs).append(item)

        if not self.rows:
            deadline = time.monotonic() + 0.1
            while not jobs and not scores:
                try:
                    take(self.waiting.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    return [], []
            if self.window:
                time.sleep(self.window)
        with contextlib.suppress(queue.Empty):
            while len(self.rows) + len(jobs) < self.max_batch_size:
                take(self.waiting.get_nowait())
        with self.waiting.mutex:  # scoring takes no row: every waiting Score runs now, however full the batch
            rest = self.waiting.queue
            scores += [item for item in rest if isinstance(item, Score) and not item.cancelled]
            kept = [item for item in rest if not isinstance(item, Score)]
            rest.clear()
            rest.extend(kept)
        # (some may have been cancelled during the window)
        return [job for job in jobs if not job.cancelled], [s for s in scores if not s.cancelled]

    def score(self, scores: list[Score]) -> None:
        """Run the waiting Scores together (one call: gpt/scoring.py batches them); a failure fails them only."""
        try:
            out = score_sequences(self.model, [seq for s in scores for seq in s.seqs], top=max(s.top for s in scores))
        except Exception as e:
            message = failure(e)
            for s in scores:
                s.send(("error", message))
            return
        start = 0
        for s in scores:
            s.send(("scored", out[start : start + len(s.seqs)]))
            start += len(s.seqs)

    def record(self, tokens: torch.Tensor, rows: list[int]) -> None:
        """For the given rows (jobs that asked for logprobs), the sampled token's logprob and the likeliest
        tokens, from the model's raw log-softmax (the distribution before temperature, top_k and top_p)."""
        logp = torch.log_softmax(self.logits[rows].float(), dim=-1)
        chosen = logp.gather(1, tokens[rows].to(logp.device)[:, None])[:, 0].tolist()
        k = min(max(self.rows[r].logprobs for r in rows), logp.size(-1))
        top_lp, top_id = (x.tolist() for x in logp.topk(k, dim=-1)) if k else ([[]] * len(rows), [[]] * len(rows))
        for i, r in enumerate(rows):
            job = self.rows[r]
            job.scores.append((int(tokens[r]), chosen[i], top_id[i][: job.logprobs], top_lp[i][: job.logprobs]))

    def step(self) -> None:
        new, scores = self.take_waiting()
        if scores:
            self.score(scores)
        if new:
            self.admit(new)
        if not self.rows:
            return
        tokens, errors = self.sample()
        wanted = [r for r, job in enumerate(self.rows) if job.logprobs is not None and r not in errors]
        if wanted:
            try:
                self.record(tokens, wanted)
            except Exception as e:  # these jobs' logprobs: fail them alone
                errors.update({r: failure(e) for r in wanted})
        keep = []
        for row, job in enumerate(self.rows):
            if job.cancelled:
                continue
            if row in errors:  # this request's sampling failed: it alone gets the error
                job.send(("error", errors[row]))
                continue
            try:
                reason = self.advance(job, int(tokens[row]))
                if reason:
                    self.remember(row, job)
                    text = job.printer.finish()
                    job.send(("done", reason, len(job.generated), text, job.scores))
            except Exception as e:  # this job's tokens or stop strings: fail it alone
                job.send(("error", failure(e)))
                continue
            if not reason:
                keep.append(row)
        if len(keep) < len(self.rows):
            self.regroup([(self.cache, keep, self.logits)], [self.rows[r] for r in keep])
            tokens = tokens[keep]
        if not self.rows:
            return
        if self.cache.length >= self.cache.max_len:  # the buffer's columns are used up: pack the rows again
            self.regroup([(self.cache, list(range(len(self.rows))), self.logits)], self.rows)
        self.logits = GPT.decode_step(self.model, tokens[:, None].to(self.device), self.cache)
        self.cache.length += 1
        for job in self.rows:
            job.cached += 1

    def advance(self, job: Job, token: int) -> Optional[str]:
        """Add a sampled token to a job; its finish_reason if that ends it."""
        if self.eos is not None and token == self.eos:
            return "stop"
        job.generated.append(token)
        if job.counts is not None:
            job.counts[token] += 1
        if job.seen is not None:
            job.seen[token] = True
        if job.printer([token]):
            return "stop"
        if len(job.generated) >= job.max_tokens or job.cached >= self.block:  # max_tokens, or the context is full
            return "length"
        return None

    def sample(self) -> tuple[torch.Tensor, dict[int, str]]:
        """One token per row, rows with the same temperature, top_k, top_p and min_p sampled together (greedy rows
        all together), each with its own penalties and logit_bias and from its own random stream; and {row: error
        message} for the rows whose sampling failed. A failure never spreads beyond its rows: a group that fails
        is sampled again row by row (from the random states it started with), so only the rows that fail alone
        are failed."""
        groups: dict[tuple, list[int]] = {}
        for row, job in enumerate(self.rows):
            key = (job.temperature, job.top_k, job.top_p, job.min_p) if job.temperature else (0.0, None, None, None)
            groups.setdefault(key, []).append(row)
        tokens = torch.zeros(len(self.rows), dtype=torch.long)
        errors: dict[int, str] = {}
        for (temperature, top_k, top_p, min_p), rows in groups.items():
            generators = None if temperature == 0 else [self.rows[r].generator for r in rows]
            states = None if generators is None else [g.get_state() for g in generators]
            try:
                tokens[rows] = sample_next_token(
                    self.logits[rows], temperature, top_k, top_p, generators, min_p, self.penalties(rows)
                ).cpu()
                continue
            except Exception:
                if generators is not None:  # rewind: each row draws again what it would have drawn
                    for g, state in zip(generators, states):
                        g.set_state(state)
            for i, r in enumerate(rows):
                try:
                    g = None if generators is None else [generators[i]]
                    one = sample_next_token(
                        self.logits[r : r + 1], temperature, top_k, top_p, g, min_p, self.penalties([r])
                    )
                    tokens[r] = one.cpu()[0]
                except Exception as e:
                    errors[r] = failure(e)
        return tokens, errors

    def penalties(self, rows: list[int]) -> Optional[Penalties]:
        """The given rows' penalties and logit_bias as one Penalties (neutral values for the rows without); None
        when none of them has any."""
        jobs = [self.rows[r] for r in rows]
        if all(job.counts is None and job.seen is None and job.bias is None for job in jobs):
            return None
        vocab, device = self.logits.size(-1), self.logits.device

        def stacked(name, empty):
            if all(getattr(job, name) is None for job in jobs):
                return None
            return torch.stack([empty if getattr(job, name) is None else getattr(job, name) for job in jobs])

        def values(name):
            return torch.tensor([getattr(job, name) for job in jobs], dtype=torch.float32, device=device)

        zeros = torch.zeros(vocab, device=device)
        p = Penalties(
            bias=stacked("bias", zeros),
            seen=stacked("seen", torch.zeros(vocab, dtype=torch.bool, device=device)),
            counts=stacked("counts", zeros),
        )
        if p.seen is not None:
            p.repetition = values("repetition_penalty")
        if p.counts is not None:
            p.frequency, p.presence = values("frequency_penalty"), values("presence_penalty")
        return p

    def admit(self, jobs: list[Job]) -> None:
        """Prefill the new jobs' prompts (a prompt asked for n times is read once) and add them to the batch.
        A failure here (a prompt the model cannot read, memory) fails the new jobs only: the batch runs on."""
        try:
            prompts: dict[tuple, int] = {}
            for job in jobs:
                prompts.setdefault(tuple(job.ids), len(prompts))
                job.cached = len(job.ids)
                job.printer = StreamPrinter(self.tokenizer, job.stops, job)
                self.penalize(job)
            groups, reused = self.prefill([list(p) for p in prompts])
        except Exception as e:
            message = failure(e)
            for job in jobs:
                job.send(("error", message))
            return
        where = {p: (g, row) for g, (_, _, members) in enumerate(groups) for row, p in enumerate(members)}
        for job in jobs:
            job.reused = reused[prompts[tuple(job.ids)]]
        jobs = sorted(jobs, key=lambda job: where[prompts[tuple(job.ids)]][0])  # the batch's rows: group by group
        parts = [(self.cache, list(range(len(self.rows))), self.logits)] if self.rows else []
        for g, (cache, logits, _) in enumerate(groups):
            rows = [where[prompts[tuple(job.ids)]] for job in jobs]
            parts.append((cache, [row for group, row in rows if group == g], logits))
        self.regroup(parts, self.rows + jobs)

    def penalize(self, job: Job) -> None:
        """The tensors a job's penalties and logit_bias need (see Job), on the model's device; none for a job
        without any."""
        vocab, device = self.model.config.vocab_size, self.device
        if job.frequency_penalty or job.presence_penalty:
            job.counts = torch.zeros(vocab, device=device)
        if job.repetition_penalty != 1:
            job.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            job.seen[torch.tensor(job.ids, device=device)] = True
        if job.logit_bias:
            job.bias = torch.zeros(vocab, device=device)
            job.bias[torch.tensor(list(job.logit_bias), device=device)] = torch.tensor(
                list(job.logit_bias.values()), device=device
            )

    def prefill(self, prompts: list[list[int]]) -> tuple[list[tuple[KVCache, torch.Tensor, list[int]]], list[int]]:
        """Read the prompts: groups of (KV cache, its rows' next-token logits, the prompt of each row), and the
        tokens of each prompt taken from the prefix cache. Without one: one left-padded pass over them all. With
        one: each prompt is read after its longest cached prefix, in one pass with the others as long as the
        longest cached prefix and the longest rest among them fit the context (else in another); then the keys
        and values of every prompt's whole blocks are kept (prompts read in the same step do not share: the
        first of them serves those that come later)."""
        if self.prefix_cache is None:
            cache, logits = self.read(prompts, [[] for _ in prompts])
            return [(cache, logits, list(range(len(prompts))))], [0] * len(prompts)
        hits = [self.prefix_cache.lookup(ids) for ids in prompts]
        reused = [len(hit) * self.prefix_cache.block for hit in hits]
        groups: list[list] = []  # [cached prefix width, rest width, prompts]
        for i in sorted(range(len(prompts)), key=lambda i: -reused[i]):
            rest = len(prompts[i]) - reused[i]
            fits = (g for g in groups if max(g[0], reused[i]) + max(g[1], rest) <= self.block)
            group = next(fits, None)
            if group is None:
                group = [0, 0, []]
                groups.append(group)
            group[0], group[1] = max(group[0], reused[i]), max(group[1], rest)
            group[2].append(i)
        out = []
        for _, _, members in groups:
            cache, logits = self.read([prompts[i] for i in members], [hits[i] for i in members])
            for row, i in enumerate(members):
                self.prefix_cache.store(prompts[i], reader(cache, row))
            out.append((cache, logits, members))
        return out, reused

    def read(self, prompts: list[list[int]], hits: list[list]) -> tuple[KVCache, torch.Tensor]:
        """One pass over the prompts, each row read after its cached blocks `hits` (which end at one shared
        column, padding in front of the shorter ones as with left padding; a row's positions count its real
        tokens only, so the gap between its cached and its new part is padding like any other); the KV cache
        and each row's next-token logits."""
        cache = self.model.new_cache()
        reused = start_from_blocks(cache, hits)
        idx, mask = left_pad([ids[r:] for ids, r in zip(prompts, reused)], self.pad, self.device)
        return cache, self.model(idx, attention_mask=mask, cache=cache, only_last=True).logits[:, -1]

    def remember(self, row: int, job: Job) -> None:
        """A finished job's prompt and text go to the prefix cache (their keys and values are in its row): the
        next turn of a chat, which sends the conversation so far, is read from where it goes on."""
        if self.prefix_cache is not None:
            self.prefix_cache.store((job.ids + job.generated)[: job.cached], reader(self.cache, row))

    def regroup(self, parts: list[tuple[KVCache, list[int], torch.Tensor]], jobs: list[Job]) -> None:
        """The batch becomes the given rows of the given caches (with their logits), in order."""
        self.rows = jobs
        if not jobs:
            self.cache, self.logits = None, None
            return
        if (
            len(parts) == 1
            and parts[0][1] == list(range(parts[0][0].k[0].size(0)))
            and parts[0][0].length < parts[0][0].max_len
        ):  # the same rows, room left: keep the cache as it is
            self.cache, self.logits = parts[0][0], parts[0][2]
            if self.cache.slot is None:
                self.cache.start_decoding()
            return
        self.cache = pack_rows([(cache, rows) for cache, rows, _ in parts], self.model.new_cache())
        self.logits = torch.cat([logits[rows] for _, rows, logits in parts])


def failure(e: Exception) -> str:
    """The error event's message for an exception, on one line; a bug (not a GPTError) also prints its traceback."""
    if isinstance(e, GPTError):
        return str(e)
    traceback.print_exception(e)
    detail = " ".join(f"{type(e).__name__}: {e}".split())
    return f"the server failed on this request ({detail}); this is a bug: please report it"
