"""Fine-tuning examples as tokens and batches: `prompt + response + <|endoftext|>` with the labels -100 on the
prompt and the padding, chat conversations with the loss on every assistant turn, preference pairs (two answers
to one prompt, batched together), packing several examples into one row (attention cannot cross them, positions
restart), and batches of similar length.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from gpt.errors import GPTError
from gpt.prompts import ChatTemplate
from gpt.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # -100 where no loss is wanted
    truncated: bool


def encode_example(prompt_ids: list[int], response_ids: list[int], eos_id: Optional[int], block_size: int) -> Encoded:
    """prompt + response + EOS, shifted for next-token prediction, the prompt's positions masked.

    Prompt and response are tokenized separately, exactly as at generation time (the prompt is encoded
    alone and the model continues it). Longer than block_size + 1 tokens: the end is cut off. eos_id None: the
    response already ends as it should (a chat template's reply closes itself).
    """
    ids = prompt_ids + response_ids + ([eos_id] if eos_id is not None else [])
    truncated = len(ids) > block_size + 1
    ids = ids[: block_size + 1]
    # labels[i] is the token after position i; it counts only when it belongs to the response
    n_prompt = len(prompt_ids)
    labels = [tok if i + 1 >= n_prompt else -100 for i, tok in enumerate(ids[1:])]
    return Encoded(ids[:-1], labels, truncated)


APPEND_ONLY = (
    "the chat template does not render a conversation as its earlier turns plus the new one; chat data "
    "(task=chat, chat-form preference pairs) needs a template that only appends"
)


def split_reply(template: ChatTemplate, messages: list[dict]) -> tuple[str, str]:
    """A conversation that ends in an assistant message -> (the prompt asking for it, the reply as the template
    renders it after that prompt: with the default template its text and the end-of-text token)."""
    prompt, full = template(messages[:-1], add_generation_prompt=True), template(messages, False)
    if not full.startswith(prompt):
        raise GPTError(APPEND_ONLY)
    return prompt, full[len(prompt) :]


def encode_chat(messages: list[dict], template: ChatTemplate, tokenizer: Tokenizer, block_size: int) -> Encoded:
    """A conversation as the template renders it, the loss on every assistant message only (each as the
    template renders it after the generation prompt: with the default template its text and the end-of-text
    token). The pieces are tokenized apart, as at generation time, where the prompt is encoded alone."""
    pieces, done = [], ""  # (text, learn it?)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, reply = split_reply(template, messages[: i + 1])
        if not prompt.startswith(done):
            raise GPTError(APPEND_ONLY)
        pieces += [(prompt[len(done) :], False), (reply, True)]
        done = prompt + reply
    ids, learn = [], []
    for text, target in pieces:
        piece = tokenizer.encode(text) if text else []
        ids += piece
        learn += [target] * len(piece)
    truncated = len(ids) > block_size + 1
    ids, learn = ids[: block_size + 1], learn[: block_size + 1]
    labels = [tok if learn[i + 1] else -100 for i, tok in enumerate(ids[1:])]
    return Encoded(ids[:-1], labels, truncated)


def pad_batch(examples: Sequence[dict], pad_id: int) -> dict:
    """Right-pad to the longest example in the batch (not to the context length).

    No attention mask is needed: attention is causal, so a real token never sees the padding after it,
    and its position ids are the same as unpadded. Padding only gets label -100. `n_tokens` (a Python int:
    no device sync to read it) counts the real tokens, for tokens/s.
    """
    T = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.as_tensor(e["input_ids"])
        labels[i, :n] = torch.as_tensor(e["labels"])
    batch = {"input_ids": input_ids, "labels": labels, "n_tokens": sum(len(e["input_ids"]) for e in examples)}
    if "segments" in examples[0]:  # packed rows (pack_examples): attention and positions per example
        batch["position_ids"], batch["attention_mask"] = packed_attention([e["segments"] for e in examples], T)
    return batch


SIDES = ("chosen", "rejected")  # a preference pair's two answers, in batch order


def pad_pairs(pairs: Sequence[dict], pad_id: int) -> dict:
    """Preference pairs as one padded batch: the chosen answers in rows 0..B-1, the rejected ones in rows B..2B-1
    (pair i is rows i and B + i), so one forward pass scores both sides. `pairs`: B."""
    sides = [{"input_ids": p[f"{side}_input_ids"], "labels": p[f"{side}_labels"]} for side in SIDES for p in pairs]
    return {**pad_batch(sides, pad_id), "pairs": len(pairs)}


def pack_examples(examples: Sequence[dict], block_size: int) -> list[dict]:
    """Several examples per row of at most block_size tokens, so that little of a batch is padding. Longest
    first, each row filled up with the shortest examples left (two pointers over the sorted lengths: one pass,
    deterministic). A row keeps its examples' lengths (`segments`): attention and positions stay per example."""
    order = sorted(range(len(examples)), key=lambda i: -examples[i]["length"])
    rows, i, j = [], 0, len(order) - 1
    while i <= j:
        members, room = [order[i]], block_size - examples[order[i]]["length"]
        i += 1
        while i <= j and examples[order[j]]["length"] <= room:
            members.append(order[j])
            room -= examples[order[j]]["length"]
            j -= 1
        picked = [examples[m] for m in members]
        rows.append(
            {
                "input_ids": [t for e in picked for t in e["input_ids"]],
                "labels": [t for e in picked for t in e["labels"]],
                "segments": [e["length"] for e in picked],
                "length": block_size - room,
            }
        )
    return rows


def packed_attention(segments: Sequence[Sequence[int]], T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids (B, T) that restart at 0 for each example of a packed row, and the (B, 1, T, T) boolean
    mask under which a token sees the tokens before it in its own example only (block-diagonal, causal).
    Padding after the last example is one more block: it sees only padding, never a NaN row."""
    B = len(segments)
    doc = torch.full((B, T), len(max(segments, key=len)), dtype=torch.long)  # padding: its own block
    pos = torch.zeros(B, T, dtype=torch.long)
    for b, lengths in enumerate(segments):
        start = 0
        for k, n in enumerate(lengths):
            doc[b, start : start + n] = k
            pos[b, start : start + n] = torch.arange(n)
            start += n
        pos[b, start:] = torch.arange(T - start)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return pos, ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


class LengthGroupedBatches:
    """Batches of similar length, so little compute goes into padding.

    Each epoch shuffles the examples (seeded by (seed, epoch)), sorts them by length within groups of
    `group` batches, cuts the groups into batches and shuffles the batches: random like plain shuffling,
    but each batch holds examples of nearly the same length.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, shuffle: bool = True, group: int = 50):
        self.lengths, self.batch_size, self.seed, self.shuffle, self.group = (
            np.asarray(lengths),
            batch_size,
            seed,
            shuffle,
            group,
        )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if not self.shuffle:  # validation: longest first, in a fixed order
            order = np.argsort(-self.lengths, kind="stable")
            yield from (order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size))
            return
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        span = self.batch_size * self.group
        batches = []
        for g in range(0, len(order), span):
            chunk = order[g : g + span]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i : i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        for b in rng.permutation(len(batches)):
            yield batches[b]


class EpochStream(IterableDataset):
    """The training batches of a whole run: epoch after epoch of `batches` (reshuffled per epoch), counted in
    micro-batches, so that micro-batch i is a function of (seed, i) alone. A run resumed at step s starts the
    stream at s * accumulate and sees exactly the batches the uninterrupted run would have, mid-epoch too.
    Data-parallel rank r of world_size takes global batch i * world_size + r.
    """

    def __init__(
        self,
        data: list,
        batches: LengthGroupedBatches,
        collate,
        start: int = 0,
        stop: Optional[int] = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.data, self.batches, self.collate = data, batches, collate
        self.start, self.stop, self.rank, self.world_size = start, stop, rank, world_size

    def __len__(self):  # the whole run, as RandomWindows (Lightning compares its restored counter with it)
        if self.stop is None:
            raise TypeError("endless stream")
        return self.stop

    def __iter__(self):
        worker = get_worker_info()
        step, first = (1, self.start) if worker is None else (worker.num_workers, self.start + worker.id)
        n, epoch, order = len(self.batches), None, []
        i = first
        while self.stop is None or i < self.stop:
            e, pos = divmod(i * self.world_size + self.rank, n)
            if e != epoch:
                self.batches.set_epoch(e)
                epoch, order = e, list(self.batches)
            yield self.collate([self.data[j] for j in order[pos]])
            i += step
