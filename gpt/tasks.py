"""Task datasets for fine-tuning: rows of (instruction, input, output), a prompt template, and batches in
which only the response counts.

    parallel text: a source file + a target file, line-aligned          \\
    Alpaca JSON / JSONL: {"instruction", "input", "output"} per record    |-> rows -> template -> tokens
    prompt/response JSON / JSONL: {"prompt", "response"} per record      |   -> batches padded to the
    a Hugging Face hub dataset with either layout                        /      longest in the batch

Every example is `prompt + response + <|endoftext|>`. The labels are -100 on the prompt (and on padding),
so the loss counts the response tokens and the end-of-text token only. Examples longer than the context
are cut at the context length and counted; an example whose prompt alone fills the context has nothing
left to learn from and is dropped (and counted).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator, Optional, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gpt.taskrows import FORMATS, BadRows, read_hub, read_json_records, read_parallel
from gpt.errors import GPTError, check_num_workers
from gpt.prompts import DEFAULT_CHAT_TEMPLATE, ChatTemplate, PromptTemplate
from gpt.tokenizer import EOS, Tokenizer

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------
# Prompts and tokens


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # -100 where no loss is wanted
    truncated: bool


def encode_example(prompt_ids: list[int], response_ids: list[int], eos_id: int, block_size: int) -> Encoded:
    """prompt + response + EOS, shifted for next-token prediction, the prompt's positions masked.

    Prompt and response are tokenized separately, exactly as at generation time (the prompt is encoded
    alone and the model continues it). Longer than block_size + 1 tokens: the end is cut off.
    """
    ids = prompt_ids + response_ids + [eos_id]
    truncated = len(ids) > block_size + 1
    ids = ids[:block_size + 1]
    # labels[i] is the token after position i; it counts only when it belongs to the response
    n_prompt = len(prompt_ids)
    labels = [tok if i + 1 >= n_prompt else -100 for i, tok in enumerate(ids[1:])]
    return Encoded(ids[:-1], labels, truncated)


def encode_chat(messages: list[dict], template: ChatTemplate, tokenizer: Tokenizer, block_size: int) -> Encoded:
    """A conversation as the template renders it, the loss on every assistant message only (each as the
    template renders it after the generation prompt: with the default template its text and the end-of-text
    token). The pieces are tokenized apart, as at generation time, where the prompt is encoded alone."""
    pieces, done = [], ""  # (text, learn it?)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, full = template(messages[:i], add_generation_prompt=True), template(messages[:i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise GPTError("the chat template does not render a conversation as its earlier turns plus the new "
                           "one; task=chat needs a template that only appends")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    ids, learn = [], []
    for text, target in pieces:
        piece = tokenizer.encode(text) if text else []
        ids += piece
        learn += [target] * len(piece)
    truncated = len(ids) > block_size + 1
    ids, learn = ids[:block_size + 1], learn[:block_size + 1]
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
        rows.append({"input_ids": [t for e in picked for t in e["input_ids"]],
                     "labels": [t for e in picked for t in e["labels"]],
                     "segments": [e["length"] for e in picked], "length": block_size - room})
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
            doc[b, start:start + n] = k
            pos[b, start:start + n] = torch.arange(n)
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
        self.lengths, self.batch_size, self.seed, self.shuffle, self.group = np.asarray(lengths), batch_size, seed, shuffle, group
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if not self.shuffle:  # validation: longest first, in a fixed order
            order = np.argsort(-self.lengths, kind="stable")
            yield from (order[i:i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size))
            return
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        span = self.batch_size * self.group
        batches = []
        for g in range(0, len(order), span):
            chunk = order[g:g + span]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        for b in rng.permutation(len(batches)):
            yield batches[b]


class EpochStream(IterableDataset):
    """The training batches of a whole run: epoch after epoch of `batches` (reshuffled per epoch), counted in
    micro-batches, so that micro-batch i is a function of (seed, i) alone. A run resumed at step s starts the
    stream at s * accumulate and sees exactly the batches the uninterrupted run would have, mid-epoch too.
    Data-parallel rank r of world_size takes global batch i * world_size + r.
    """

    def __init__(self, data: list, batches: LengthGroupedBatches, collate, start: int = 0, stop: Optional[int] = None,
                 rank: int = 0, world_size: int = 1):
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


# ----------------------------------------------------------------------------------------------------
# The LightningDataModule


class TaskDataModule(L.LightningDataModule):
    """A fine-tuning task: reads rows, renders prompts, tokenizes, serves padded batches.

    See configs/task/*.yaml for the options. `tokenizer` and `block_size` come from the base model.
    """

    def __init__(self, name: str, format: str, template: str, tokenizer: Tokenizer, block_size: int,
                 batch_size: int = 16, train=None, valid=None, root: Optional[str] = None,
                 hub: Optional[dict] = None, fields: Optional[dict] = None, template_no_input: Optional[str] = None,
                 valid_fraction: float = 0.05, on_bad_row: str = "error", group_by_length: bool = True,
                 metrics: Sequence[str] = ("loss",), stop: Sequence[str] = (), max_new_tokens: int = 128,
                 copy_pairs: float = 0.0, seed: int = 1337, num_workers: int = 0, valid_only: bool = False,
                 packing: bool = False, chat_template: Optional[str] = None):
        """chat_template (format chat): the base model's Jinja chat_template; None: DEFAULT_CHAT_TEMPLATE."""
        """valid_only: only the valid split is read and tokenized (scoring an adapter); the train split is
        then needed only when the valid split is held out of it."""
        super().__init__()
        if format not in FORMATS:
            raise GPTError(f"task.format must be one of {list(FORMATS)} (got {format!r})")
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise GPTError(f"task.batch_size must be a positive integer (got {batch_size!r})")
        if train is None and not (hub and hub.get("name")):
            if valid_only and valid is None:
                raise GPTError(f"task {name}: say what to score: task.valid=<file> (parallel: task.valid=[source,"
                               "target]), or task.train=<file> to hold out task.valid_fraction of it, or "
                               "task.hub.name=<dataset>")
            if not valid_only:
                raise GPTError(f"task {name}: say where the training data is: task.train=<file> "
                               "(parallel: task.train=[source,target]) or task.hub.name=<dataset>")
        if hub and hub.get("name") and (train is not None or valid is not None):
            given = "task.train" if train is not None else "task.valid"
            raise GPTError(f"task {name}: both {given} (files) and task.hub.name={hub['name']} give the data; keep one: "
                           f"{given}=null to use the hub dataset, or drop task.hub.name")
        self.name, self.format, self.tokenizer, self.block_size = name, format, tokenizer, block_size
        self.batch_size, self.train_spec, self.valid_spec, self.root = batch_size, train, valid, root
        self.fields = {**FORMATS[format], **(dict(fields) if fields else {})}
        self.hub = dict(hub) if hub and hub.get("name") else None
        self.template = PromptTemplate(template, template_no_input)
        self.chat = ChatTemplate(chat_template or DEFAULT_CHAT_TEMPLATE, {"eos_token": EOS}) \
            if format == "chat" else None
        check_num_workers(num_workers, "task.num_workers")
        self.valid_fraction, self.seed, self.num_workers = valid_fraction, seed, num_workers
        self.bad = BadRows(on_bad_row, name)
        self.group_by_length, self.metrics, self.stop = group_by_length, list(metrics), list(stop)
        self.max_new_tokens = max_new_tokens
        if not (0.0 <= copy_pairs <= 1.0):
            raise GPTError(f"task.copy_pairs must be in [0, 1] (got {copy_pairs})")
        self.copy_pairs, self.valid_only = copy_pairs, valid_only
        if not isinstance(packing, bool):
            raise GPTError(f"task.packing is true or false (got {packing!r})")
        self.packing = packing
        self.rows: dict[str, list[dict]] = {}
        self.data: dict[str, list[dict]] = {}
        self.stats: dict[str, dict] = {}

    # -- rows ----------------------------------------------------------------------------------------

    def _path(self, p) -> Path:
        p = Path(str(p)).expanduser()
        return p if p.is_absolute() or not self.root else Path(self.root).expanduser() / p

    def _read(self, split: str) -> Optional[list[dict]]:
        """The rows of one split, or None when the task does not provide that split."""
        if self.hub:
            hub_split = self.hub.get(f"{split}_split", "train" if split == "train" else None)
            return read_hub(dict(self.hub), hub_split, self.fields, self.name, self.bad) if hub_split else None
        spec = self.train_spec if split == "train" else self.valid_spec
        if spec is None:
            return None
        if self.format == "parallel":
            if isinstance(spec, str) or len(spec) != 2:
                raise GPTError(f"task {self.name}: a parallel split is two files, [source, target] (got {spec!r})")
            return read_parallel(self._path(spec[0]), self._path(spec[1]), self.name, self.bad)
        if not isinstance(spec, str):
            raise GPTError(f"task {self.name}: a {self.format} split is one .json or .jsonl file (got {spec!r})")
        return read_json_records(self._path(spec), self.fields, self.name, self.bad)

    def _source(self, split: str) -> str:
        """Where a split's rows come from, for messages."""
        if self.hub:
            return f"the hub dataset {self.hub['name']}"
        spec = self.train_spec if split == "train" else self.valid_spec
        return " + ".join(str(self._path(p)) for p in ([spec] if isinstance(spec, str) else spec))

    def load_rows(self) -> dict[str, list[dict]]:
        """The train and valid rows (valid held out from train when the task has no valid split)."""
        if self.rows:
            return self.rows
        has_valid = self.hub.get("valid_split") is not None if self.hub else self.valid_spec is not None
        splits = ("valid",) if self.valid_only and has_valid else ("train", "valid")  # scoring needs no train rows
        train = self._read("train") if "train" in splits else None
        skipped = {"train": self.bad.report("train")}
        valid = self._read("valid")
        skipped["valid"] = self.bad.report("valid")
        held_out = valid is None
        if held_out:
            if not (0.0 < self.valid_fraction < 1.0):
                raise GPTError(f"task.valid_fraction must be in (0, 1) (got {self.valid_fraction})")
            order = np.random.default_rng(self.seed).permutation(len(train))
            n_valid = max(1, int(len(train) * self.valid_fraction))
            valid, train = [train[i] for i in sorted(order[:n_valid])], [train[i] for i in sorted(order[n_valid:])]
        for split, rows in (("train", train), ("valid", valid)):
            if split not in splits:
                continue
            if not rows:
                why = (f" (all {skipped[split]} rows were skipped as malformed: task.on_bad_row=skip)" if skipped[split]
                       else f" (its {len(valid)} row(s) went to the valid split that task.valid_fraction holds out: add "
                            "rows, or give a valid split of its own)" if split == "train" and held_out and valid else "")
                source = self._source("train" if split == "valid" and held_out else split)
                needed = ("instruction", "output") if self.format == "alpaca" else ("input", "output")  # alpaca: input optional
                rows_are = ("a pair per line" if self.format == "parallel" and not self.hub else
                            "rows with " + ", ".join(repr(self.fields[k]) for k in needed if self.fields.get(k)))
                raise GPTError(f"task {self.name}: the {split} split has no usable rows{why}; read from {source}: "
                               f"give it {rows_are}")
        self.rows = {"train": train, "valid": valid} if "train" in splits else {"valid": valid}
        self.stats = {s: {"rows": len(r), "skipped": skipped[s]} for s, r in self.rows.items()}
        return self.rows

    def training_rows(self) -> list[dict]:
        """The train rows, plus (task.copy_pairs > 0) that share of them again with their output as input.

        "Copied corpus" augmentation (Currey et al., 2017): pairs whose answer is their input teach the model
        to carry words over from the prompt, which a task like modern -> Shakespeare mostly consists of.
        """
        rows = self.load_rows()["train"]
        if not self.copy_pairs:
            return rows
        rng = np.random.default_rng([self.seed, 1])
        picked = sorted(rng.choice(len(rows), size=int(len(rows) * self.copy_pairs), replace=False))
        return rows + [{**rows[i], "input": rows[i]["output"]} for i in picked]

    def prompt(self, row: dict) -> str:
        if self.chat:  # the conversation up to its last assistant message, which is the answer to score
            last = max(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
            return self.chat(row["messages"][:last])
        return self.template(row["instruction"], row["input"])

    # -- tokens --------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        if self.data:
            return
        from datasets import Dataset
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()  # a bar per split and step says nothing here; the summary line below does
        if self.tokenizer.eos_id is None:
            raise GPTError("the tokenizer has no <|endoftext|> token, so responses cannot be terminated")

        splits = [("valid", self.load_rows()["valid"])]
        if not self.valid_only:
            splits.insert(0, ("train", self.training_rows()))
        for split, rows in splits:
            prompts, responses = [self.prompt(r) for r in rows], [r["output"] for r in rows]
            if self.chat:
                ds = Dataset.from_list([self._encoded(encode_chat(r["messages"], self.chat, self.tokenizer,
                                                                  self.block_size)) for r in rows])
            else:
                self._check_fields(split, rows)
                ds = Dataset.from_dict({"prompt": prompts, "response": responses})
                ds = ds.map(self._encode, batched=True, remove_columns=["prompt", "response"])
            kept = ds.filter(lambda n: n > 0, input_columns="n_targets")
            self._warn_unknown(split, [p + r for p, r in zip(prompts, responses)])
            self.data[split] = kept.with_format(None).to_list()
            self.stats[split].update(examples=len(kept), copy_pairs=len(rows) - len(self.rows[split]), truncated=int(sum(kept["truncated"])),
                                     dropped=len(ds) - len(kept), tokens=int(sum(ds["length"])))
            log.info("%s %s: %d examples (%d copy pairs), %d truncated to the context (%d tokens), %d dropped (prompt fills the "
                     "context), %d malformed rows skipped", self.name, split, len(kept), self.stats[split]["copy_pairs"],
                     self.stats[split]["truncated"],
                     self.block_size, self.stats[split]["dropped"], self.stats[split]["skipped"])
            if not kept:
                raise GPTError(f"task {self.name}: every {split} prompt fills the model's context "
                               f"({self.block_size} tokens); shorten the prompts or use a model with a longer context")
            if self.packing and split == "train":  # validation stays one example a row: the same loss, and
                self.data[split] = pack_examples(self.data[split], self.block_size)  # scoring reads examples
                self.stats[split]["packed_rows"] = len(self.data[split])
                log.info("%s train: packed into %d rows of up to %d tokens (%.0f%% filled)", self.name,
                         len(self.data[split]), self.block_size,
                         100 * sum(r["length"] for r in self.data[split]) / (len(self.data[split]) * self.block_size))

    def _check_fields(self, split: str, rows: list[dict]) -> None:
        """A row's text that the prompt template has no place for would be silently dropped: refused."""
        lost = [(i, f) for i, r in enumerate(rows) for f in self.template.left_out(r["instruction"], r["input"])]
        if lost:
            field = lost[0][1]
            raise GPTError(f"task {self.name} {split}: {len({i for i, _ in lost})} of {len(rows)} rows have an {{{field}}} "
                           f"that the prompt template {self.template.template!r} leaves out; use a template with "
                           f"{{{field}}} (task.template=...), or rows of the format the template was made for")

    def _warn_unknown(self, split: str, texts: list[str]) -> None:
        """A char-level base meets characters it never saw: they train and are scored as <|unk|>. Said, with
        the characters, before any training."""
        per_row = [self.tokenizer.unknown_chars(text) for text in texts]
        hit = sum(map(bool, per_row))
        if hit:
            unknown = sorted(set().union(*per_row))
            log.warning("%s %s: %d of %d examples hold characters the base model's tokenizer has never seen (%r); "
                        "they become <|unk|>. A base with a BPE tokenizer (or one trained on such text) reads them",
                        self.name, split, hit, len(texts), "".join(unknown[:20]))

    @staticmethod
    def _encoded(e: Encoded) -> dict:
        return {"input_ids": e.input_ids, "labels": e.labels, "truncated": e.truncated, "length": len(e.input_ids),
                "n_targets": sum(label != -100 for label in e.labels)}

    def _encode(self, batch: dict) -> dict:
        prompts, responses = self.tokenizer.encode_batch(batch["prompt"]), self.tokenizer.encode_batch(batch["response"])
        rows = [self._encoded(encode_example(p, r, self.tokenizer.eos_id, self.block_size))
                for p, r in zip(prompts, responses)]
        return {key: [row[key] for row in rows] for key in rows[0]} if rows else {}

    def setup(self, stage: Optional[str] = None) -> None:
        self.prepare_data()

    def train_dataloader(self) -> DataLoader:
        data = self.data["train"]
        # Without group_by_length: groups of one batch, i.e. plain shuffling.
        batches = LengthGroupedBatches([e["length"] for e in data], self.batch_size, self.seed,
                                       group=50 if self.group_by_length else 1)
        start, stop, rank, world_size, trainer = 0, len(batches), 0, 1, self.trainer  # no trainer: one epoch
        if trainer is not None:
            if not trainer.max_steps or trainer.max_steps < 0:
                raise GPTError("fine-tuning counts optimizer steps: set trainer.max_steps (one epoch is "
                               f"{len(batches)} batches of {self.batch_size})")
            # Resume: continue at the batch the interrupted run would have drawn next.
            start = trainer.global_step * trainer.accumulate_grad_batches
            stop = trainer.max_steps * trainer.accumulate_grad_batches
            rank, world_size = trainer.global_rank, trainer.world_size
        stream = EpochStream(data, batches, partial(pad_batch, pad_id=self.tokenizer.eos_id), start=start, stop=stop,
                             rank=rank, world_size=world_size)
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        data = self.data["valid"]
        sampler = LengthGroupedBatches([e["length"] for e in data], self.batch_size, self.seed, shuffle=False)
        return DataLoader(data, batch_sampler=sampler, num_workers=self.num_workers,
                          collate_fn=partial(pad_batch, pad_id=self.tokenizer.eos_id))

    def describe(self) -> dict:
        """What an adapter records about its task, so sample.py can prompt it the same way."""
        chat = {"chat_template": self.chat.jinja} if self.chat else {}
        return {"name": self.name, "format": self.format, **self.template.to_dict(), "stop": self.stop, **chat}
