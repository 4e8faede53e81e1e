"""Task datasets for fine-tuning: rows of (instruction, input, output), a prompt template, and batches in
which only the response counts.

    parallel text: a source file + a target file, line-aligned          \\
    Alpaca JSON / JSONL: {"instruction", "input", "output"} per record    |-> rows -> template -> tokens
    prompt/response JSON / JSONL: {"prompt", "response"} per record      |   -> batches padded to the
    a Hugging Face hub dataset with either layout                        /      longest in the batch

Every example is `prompt + response + <|endoftext|>`. The labels are -100 on the prompt (and on padding),
so the loss counts the response tokens and the end-of-text token only. Examples longer than the context
are cut at the context length and counted; an example whose prompt alone fills the context has nothing
left to learn from and is dropped (and counted). A preference task (format: preference, method=dpo) makes two
examples of each row, the chosen and the rejected answer to the same prompt, batched together (pad_pairs).
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from gpt.batches import (
    SIDES,
    Encoded,
    EpochStream,
    LengthGroupedBatches,
    encode_chat,
    encode_example,
    pack_examples,
    pad_batch,
    pad_pairs,
    split_reply,
)
from gpt.errors import GPTError, check_num_workers
from gpt.prompts import DEFAULT_CHAT_TEMPLATE, ChatTemplate, PromptTemplate, source_span
from gpt.taskrows import FORMATS, BadRows, read_hub, read_json_records, read_parallel
from gpt.tokenizer import EOS, Tokenizer

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------
# The LightningDataModule


class TaskDataModule(L.LightningDataModule):
    """A fine-tuning task: reads rows, renders prompts, tokenizes, serves padded batches.

    See configs/task/*.yaml for the options. `tokenizer` and `block_size` come from the base model.
    """

    def __init__(
        self,
        name: str,
        format: str,
        template: str,
        tokenizer: Tokenizer,
        block_size: int,
        batch_size: int = 16,
        train=None,
        valid=None,
        root: Optional[str] = None,
        hub: Optional[dict] = None,
        fields: Optional[dict] = None,
        template_no_input: Optional[str] = None,
        valid_fraction: float = 0.05,
        on_bad_row: str = "error",
        group_by_length: bool = True,
        metrics: Sequence[str] = ("loss",),
        stop: Sequence[str] = (),
        max_new_tokens: int = 128,
        copy_pairs: float = 0.0,
        seed: int = 1337,
        num_workers: int = 0,
        valid_only: bool = False,
        packing: bool = False,
        chat_template: Optional[str] = None,
        rejected: Optional[str] = None,
    ):
        """chat_template (format chat, and conversation pairs of format preference): the base model's Jinja
        chat_template; None: DEFAULT_CHAT_TEMPLATE. rejected (format preference): None, the rows give the rejected
        answer; "copy": the split is parallel text (or a parallel hub dataset), each pair's chosen answer is the
        target line and its rejected answer the source line copied unchanged."""
        """valid_only: only the valid split is read and tokenized (scoring an adapter); the train split is
        then needed only when the valid split is held out of it."""
        super().__init__()
        if format not in FORMATS:
            raise GPTError(f"task.format must be one of {list(FORMATS)} (got {format!r})")
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise GPTError(f"task.batch_size must be a positive integer (got {batch_size!r})")
        if train is None and not (hub and hub.get("name")):
            if valid_only and valid is None:
                raise GPTError(
                    f"task {name}: say what to score: task.valid=<file> (parallel: task.valid=[source,"
                    "target]), or task.train=<file> to hold out task.valid_fraction of it, or "
                    "task.hub.name=<dataset>"
                )
            if not valid_only:
                raise GPTError(
                    f"task {name}: say where the training data is: task.train=<file> "
                    "(parallel: task.train=[source,target]) or task.hub.name=<dataset>"
                )
        if hub and hub.get("name") and (train is not None or valid is not None):
            given = "task.train" if train is not None else "task.valid"
            raise GPTError(
                f"task {name}: both {given} (files) and task.hub.name={hub['name']} give the data; keep one: "
                f"{given}=null to use the hub dataset, or drop task.hub.name"
            )
        self.name, self.format, self.tokenizer, self.block_size = name, format, tokenizer, block_size
        self.batch_size, self.train_spec, self.valid_spec, self.root = batch_size, train, valid, root
        if rejected not in (None, "copy") or (rejected and format != "preference"):
            raise GPTError(
                f"task.rejected is null (the rows give the rejected answers) or copy (with task.format=preference: "
                f"the source line of parallel text, copied); got {rejected!r} with task.format={format}"
            )
        self.rejected = rejected
        read_as = "parallel" if rejected == "copy" else format  # "copy": the rows are parallel text's
        self.fields = {**FORMATS[read_as], **(dict(fields) if fields else {})}
        self.hub = dict(hub) if hub and hub.get("name") else None
        self.template = PromptTemplate(template, template_no_input)
        self.chat = (
            ChatTemplate(chat_template or DEFAULT_CHAT_TEMPLATE, {"eos_token": EOS})
            if format in ("chat", "preference")
            else None
        )
        check_num_workers(num_workers, "task.num_workers")
        self.valid_fraction, self.seed, self.num_workers = valid_fraction, seed, num_workers
        self.bad = BadRows(on_bad_row, name)
        self.group_by_length, self.metrics, self.stop = group_by_length, list(metrics), list(stop)
        self.max_new_tokens = max_new_tokens
        if not (0.0 <= copy_pairs <= 1.0):
            raise GPTError(f"task.copy_pairs must be in [0, 1] (got {copy_pairs})")
        if format == "preference" and (copy_pairs or packing):
            raise GPTError(
                f"task.{'copy_pairs' if copy_pairs else 'packing'} is for supervised tasks; a preference task's "
                "rows are pairs of answers: drop it (task.copy_pairs=0 task.packing=false)"
            )
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
        if self.format == "parallel" or self.rejected == "copy":
            if isinstance(spec, str) or len(spec) != 2:
                raise GPTError(f"task {self.name}: a parallel split is two files, [source, target] (got {spec!r})")
            return read_parallel(self._path(spec[0]), self._path(spec[1]), self.name, self.bad)
        if not isinstance(spec, str):
            raise GPTError(f"task {self.name}: a {self.format} split is one .json or .jsonl file (got {spec!r})")
        return read_json_records(self._path(spec), self.fields, self.name, self.bad)

    def _read_rows(self, split: str) -> Optional[list[dict]]:
        rows = self._read(split)
        if rows is not None and self.rejected == "copy":  # pairs of parallel text: the source, copied, is rejected
            rows = [{**r, "rejected": r["input"]} for r in rows]
        return rows

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
        train = self._read_rows("train") if "train" in splits else None
        skipped = {"train": self.bad.report("train")}
        valid = self._read_rows("valid")
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
                why = (
                    f" (all {skipped[split]} rows were skipped as malformed: task.on_bad_row=skip)"
                    if skipped[split]
                    else f" (its {len(valid)} row(s) went to the valid split that task.valid_fraction holds out: add "
                    "rows, or give a valid split of its own)"
                    if split == "train" and held_out and valid
                    else ""
                )
                source = self._source("train" if split == "valid" and held_out else split)
                needed = {"alpaca": ("instruction", "output"), "preference": ("input", "output", "rejected")}.get(
                    self.format, ("input", "output")
                )  # alpaca: input optional
                rows_are = (
                    "a pair per line"
                    if (self.format == "parallel" or self.rejected == "copy") and not self.hub
                    else "rows with " + ", ".join(repr(self.fields[k]) for k in needed if self.fields.get(k))
                )
                raise GPTError(
                    f"task {self.name}: the {split} split has no usable rows{why}; read from {source}: "
                    f"give it {rows_are}"
                )
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
        if self.chat and "messages" in row:  # the conversation up to its last assistant message: the answer to score
            last = max(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
            return self.chat(row["messages"][:last])
        return self.template(row["instruction"], row["input"])

    def source_span(self, row: dict) -> Optional[tuple[int, int]]:
        """Where the row's source (its input, else its instruction) lies in prompt(row), as (start, end)
        characters; None for a chat task, or a template without a place for it."""
        if self.chat:
            return None
        field = "input" if row["input"] else "instruction"
        fields = {"instruction": row["instruction"], "input": row["input"]}
        return source_span(lambda text: self.template(**{**fields, field: text}), row[field])

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
            if self.format == "preference":
                self._prepare_pairs(split, rows)
                continue
            prompts, responses = [self.prompt(r) for r in rows], [r["output"] for r in rows]
            if self.chat:
                ds = Dataset.from_list(
                    [
                        self._encoded(encode_chat(r["messages"], self.chat, self.tokenizer, self.block_size))
                        for r in rows
                    ]
                )
            else:
                self._check_fields(split, rows)
                ds = Dataset.from_dict({"prompt": prompts, "response": responses})
                ds = ds.map(self._encode, batched=True, remove_columns=["prompt", "response"])
            kept = ds.filter(lambda n: n > 0, input_columns="n_targets")
            self._warn_unknown(split, [p + r for p, r in zip(prompts, responses)])
            self.data[split] = kept.with_format(None).to_list()
            self.stats[split].update(
                examples=len(kept),
                copy_pairs=len(rows) - len(self.rows[split]),
                truncated=int(sum(kept["truncated"])),
                dropped=len(ds) - len(kept),
                tokens=int(sum(ds["length"])),
            )
            log.info(
                "%s %s: %d examples (%d copy pairs), %d truncated to the context (%d tokens), "
                "%d dropped (prompt fills the context), %d malformed rows skipped",
                self.name,
                split,
                len(kept),
                self.stats[split]["copy_pairs"],
                self.stats[split]["truncated"],
                self.block_size,
                self.stats[split]["dropped"],
                self.stats[split]["skipped"],
            )
            if not kept:
                raise GPTError(
                    f"task {self.name}: every {split} prompt fills the model's context "
                    f"({self.block_size} tokens); shorten the prompts or use a model with a longer context"
                )
            if self.packing and split == "train":  # validation stays one example a row: the same loss, and
                self.data[split] = pack_examples(self.data[split], self.block_size)  # scoring reads examples
                self.stats[split]["packed_rows"] = len(self.data[split])
                log.info(
                    "%s train: packed into %d rows of up to %d tokens (%.0f%% filled)",
                    self.name,
                    len(self.data[split]),
                    self.block_size,
                    100 * sum(r["length"] for r in self.data[split]) / (len(self.data[split]) * self.block_size),
                )

    def _pair_texts(self, row: dict) -> tuple[str, str, str]:
        """(prompt, chosen, rejected) as the model reads them: a text pair's prompt in the task's template and its
        answers as they are (the end-of-text token follows each); a conversation pair as the chat template renders
        it (the template closes each reply)."""
        if "messages" in row:
            prompt, chosen = split_reply(self.chat, row["messages"])
            other = [*row["messages"][:-1], {"role": "assistant", "content": row["rejected"]}]
            return prompt, chosen, split_reply(self.chat, other)[1]
        return self.template(row["instruction"], row["input"]), row["output"], row["rejected"]

    def _prepare_pairs(self, split: str, rows: list[dict]) -> None:
        """A preference split as pairs of examples, one per answer, both on the same prompt tokens (each answer cut
        at the context, as in SFT). A pair is left out when its two answers are the same (task.rejected=copy, where
        a target line equals its source: it prefers neither), and dropped when its prompt fills the context (no
        answer token is left to compare)."""
        self._check_fields(split, [r for r in rows if "messages" not in r])
        texts = [self._pair_texts(r) for r in rows]
        ids = [self.tokenizer.encode_batch([t[k] for t in texts]) for k in range(3)]
        data, same, dropped, truncated, tokens = [], 0, 0, 0, 0
        for row, prompt, *answers in zip(rows, *ids):
            if row["output"] == row["rejected"]:
                same += 1
                continue
            eos = None if "messages" in row else self.tokenizer.eos_id
            sides = [encode_example(prompt, answer, eos, self.block_size) for answer in answers]
            tokens += sum(len(e.input_ids) for e in sides)
            if not all(any(label != -100 for label in e.labels) for e in sides):
                dropped += 1
                continue
            truncated += any(e.truncated for e in sides)
            pair = {
                f"{side}_{key}": getattr(e, key) for side, e in zip(SIDES, sides) for key in ("input_ids", "labels")
            }
            data.append({**pair, "length": max(len(e.input_ids) for e in sides)})
        self._warn_unknown(split, ["".join(t) for t in texts])
        self.data[split] = data
        self.stats[split].update(examples=len(data), same=same, truncated=truncated, dropped=dropped, tokens=tokens)
        log.info(
            "%s %s: %d pairs, %d truncated to the context (%d tokens), %d dropped (prompt fills the context), "
            "%d left out (chosen = rejected), %d malformed rows skipped",
            self.name,
            split,
            len(data),
            truncated,
            self.block_size,
            dropped,
            same,
            self.stats[split]["skipped"],
        )
        if not data:
            raise GPTError(
                f"task {self.name}: no {split} pair is left to learn from ({same} have the same chosen and rejected "
                f"answer, {dropped} a prompt that fills the model's context of {self.block_size} tokens); give "
                "pairs whose answers differ, with shorter prompts"
            )

    def _check_fields(self, split: str, rows: list[dict]) -> None:
        """A row's text that the prompt template has no place for would be silently dropped: refused."""
        lost = [(i, f) for i, r in enumerate(rows) for f in self.template.left_out(r["instruction"], r["input"])]
        if lost:
            field = lost[0][1]
            raise GPTError(
                f"task {self.name} {split}: {len({i for i, _ in lost})} of {len(rows)} rows have an {{{field}}} "
                f"that the prompt template {self.template.template!r} leaves out; use a template with "
                f"{{{field}}} (task.template=...), or rows of the format the template was made for"
            )

    def _warn_unknown(self, split: str, texts: list[str]) -> None:
        """A char-level base meets characters it never saw: they train and are scored as <|unk|>. Said, with
        the characters, before any training."""
        per_row = [self.tokenizer.unknown_chars(text) for text in texts]
        hit = sum(map(bool, per_row))
        if hit:
            unknown = sorted(set().union(*per_row))
            log.warning(
                "%s %s: %d of %d examples hold characters the base model's tokenizer has never seen (%r); "
                "they become <|unk|>. A base with a BPE tokenizer (or one trained on such text) reads them",
                self.name,
                split,
                hit,
                len(texts),
                "".join(unknown[:20]),
            )

    @staticmethod
    def _encoded(e: Encoded) -> dict:
        return {
            "input_ids": e.input_ids,
            "labels": e.labels,
            "truncated": e.truncated,
            "length": len(e.input_ids),
            "n_targets": sum(label != -100 for label in e.labels),
        }

    def _encode(self, batch: dict) -> dict:
        prompts, responses = (
            self.tokenizer.encode_batch(batch["prompt"]),
            self.tokenizer.encode_batch(batch["response"]),
        )
        rows = [
            self._encoded(encode_example(p, r, self.tokenizer.eos_id, self.block_size))
            for p, r in zip(prompts, responses)
        ]
        return {key: [row[key] for row in rows] for key in rows[0]} if rows else {}

    def setup(self, stage: Optional[str] = None) -> None:
        self.prepare_data()

    def train_dataloader(self) -> DataLoader:
        data = self.data["train"]
        # Without group_by_length: groups of one batch, i.e. plain shuffling.
        batches = LengthGroupedBatches(
            [e["length"] for e in data], self.batch_size, self.seed, group=50 if self.group_by_length else 1
        )
        start, stop, rank, world_size, trainer = 0, len(batches), 0, 1, self.trainer  # no trainer: one epoch
        if trainer is not None:
            if not trainer.max_steps or trainer.max_steps < 0:
                raise GPTError(
                    "fine-tuning counts optimizer steps: set trainer.max_steps (one epoch is "
                    f"{len(batches)} batches of {self.batch_size})"
                )
            # Resume: continue at the batch the interrupted run would have drawn next.
            start = trainer.global_step * trainer.accumulate_grad_batches
            stop = trainer.max_steps * trainer.accumulate_grad_batches
            rank, world_size = trainer.global_rank, trainer.world_size
        stream = EpochStream(data, batches, self.collate, start=start, stop=stop, rank=rank, world_size=world_size)
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        data = self.data["valid"]
        sampler = LengthGroupedBatches([e["length"] for e in data], self.batch_size, self.seed, shuffle=False)
        return DataLoader(data, batch_sampler=sampler, num_workers=self.num_workers, collate_fn=self.collate)

    @property
    def collate(self):
        """Examples -> a padded batch (preference pairs: both answers of each pair, gpt.batches.pad_pairs)."""
        return partial(pad_pairs if self.format == "preference" else pad_batch, pad_id=self.tokenizer.eos_id)

    @property
    def uses_chat(self) -> bool:
        """Whether examples are rendered with the chat template (task=chat, or conversation pairs), so that the
        result records it."""
        return self.format == "chat" or any("messages" in r for rows in self.rows.values() for r in rows)

    def describe(self) -> dict:
        """What an adapter records about its task, so sample.py can prompt it the same way."""
        chat = {"chat_template": self.chat.jinja} if self.uses_chat else {}
        return {"name": self.name, "format": self.format, **self.template.to_dict(), "stop": self.stop, **chat}
