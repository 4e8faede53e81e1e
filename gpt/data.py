"""Corpora for pretraining: find the text, tokenize it once into a token file, serve random windows.

    text file(s) / hub dataset --(datasets, streamed)--> tokenizer --(encode_batch)--> tokens.bin (memmap)

The token file is one flat array of token ids (uint16 when the vocabulary fits, else uint32); the first
(1 - val_fraction) of it is the train split, the rest the validation split. It is built in one streaming
pass (memory does not grow with the corpus), written to a temporary directory and renamed into place, and
cached under `cache_dir` keyed by the source files and the tokenizer settings, so later runs reuse it.
Training reads random windows straight from the memmap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from glob import escape
from pathlib import Path
from typing import Iterator, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from gpt.datafiles import load_hub_dataset, resolve_files, sha256_file
from gpt.errors import GPTError, check_num_workers, storage_errors
from gpt.jsonfiles import read_store_meta
from gpt.textfiles import check_text_files
from gpt.tokenizer import EOS, TOKENIZER_FILE, UNK, Tokenizer

log = logging.getLogger(__name__)

STORE_VERSION = 2  # bump when the token file layout changes, to invalidate caches
LINES_PER_BATCH = 1_000
CHUNK_BYTES = 1 << 20


# ----------------------------------------------------------------------------------------------------
# Streaming the text through `datasets`


class TextSource:
    """Batches of text from local files (line by line, line breaks kept) or a hub dataset (one row = one
    document). Iterable any number of times, streaming each time.

    Each document ends with the end-of-text token, as in GPT-2's corpora: each hub row is a document, and
    so is each file of a corpus of several files (a corpus of one file is left as it is). A UTF-8
    byte-order mark at the start of a file is not text and is dropped.
    """

    def __init__(self, files: Optional[list[Path]] = None, hub: Optional[dict] = None):
        self.files, self.hub = files, hub
        self._hub_dataset = None

    def open(self) -> None:
        """Open a hub dataset now (a name that cannot be opened fails here, not inside a tokenizer's trainer)."""
        if self.hub and self._hub_dataset is None:
            hub = self.hub
            self._hub_dataset = load_hub_dataset(
                hub["name"],
                hub.get("config"),
                hub.get("split", "train"),
                streaming=True,
                instead="use local files with data.path",
            )

    def fingerprint(self) -> dict:
        if self.files:
            return {"files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in self.files]}
        return {"hub": dict(self.hub)}

    def batches(self, doc_ends: bool = True) -> Iterator[list[str]]:
        """Lists of strings to tokenize; with doc_ends, an end-of-text token after each document (the
        tokenizers are built without them: it is a special token, not text)."""
        from datasets import load_dataset  # slow import: only when a corpus is (re)built

        if self.files:
            # data_files are patterns to datasets: a file name with [ ] * ? goes in escaped
            ds = load_dataset(
                "text",
                data_files=[escape(str(f)) for f in self.files],
                split="train",
                keep_linebreaks=True,
                streaming=True,
                chunksize=CHUNK_BYTES,
            )
            per_file = ds.num_shards == len(self.files)  # the text builder's shards are its files, in order
            end = [EOS] if doc_ends and per_file and len(self.files) > 1 else []
            for i in range(ds.num_shards if per_file else 1):
                first = True
                shard = ds.shard(num_shards=ds.num_shards, index=i) if per_file else ds
                for batch in shard.iter(batch_size=LINES_PER_BATCH):
                    lines = batch["text"]
                    if first and lines:
                        lines[0], first = lines[0].removeprefix("\ufeff"), False
                    yield lines
                if end:
                    yield end
            return
        self.open()
        column = self.hub.get("text_column", "text")
        for batch in self._hub_dataset.iter(batch_size=LINES_PER_BATCH):
            if column not in batch:
                raise GPTError(
                    f"hub dataset has no column {column!r} (columns: {sorted(batch)}); set data.hub.text_column"
                )
            yield [t + EOS for t in batch[column]] if doc_ends else batch[column]


# ----------------------------------------------------------------------------------------------------
# The token store on disk


class TokenStore:
    """A prepared corpus: `tokens.bin` (flat ids), `tokenizer.json` and `meta.json` in one directory."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.meta = read_store_meta(self.root)  # checked, field by field and against tokens.bin
        self.tokenizer = Tokenizer.load(self.root / "tokenizer.json")
        self.dtype = np.dtype(self.meta["dtype"])

    @property
    def path(self) -> Path:
        return self.root / "tokens.bin"

    def split_range(self, split: str) -> tuple[int, int]:
        """(offset, length) of a split inside tokens.bin, in tokens."""
        n, n_train = self.meta["n_tokens"], self.meta["n_train"]
        return (0, n_train) if split == "train" else (n_train, n - n_train)

    def tokens(self, split: str) -> np.ndarray:
        offset, length = self.split_range(split)
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=offset * self.dtype.itemsize, shape=(length,))


def token_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    limits = {"uint16": 2**16, "uint32": 2**32}
    if requested == "auto":
        return np.dtype("uint16" if vocab_size <= limits["uint16"] else "uint32")
    if requested not in limits:
        raise GPTError(f"data.dtype must be auto, uint16 or uint32 (got {requested!r})")
    if vocab_size > limits[requested]:
        raise GPTError(
            f"the tokenizer has {vocab_size} tokens, more than {requested} can hold ({limits[requested]}); "
            "use data.dtype=uint32 (or auto)"
        )
    return np.dtype(requested)


def build_tokenizer(source: TextSource, kind: str, vocab_size: Optional[int], path: Optional[str]) -> Tokenizer:
    if kind == "file" or path:
        if not path:
            raise GPTError("data.tokenizer=file needs data.tokenizer_path=<tokenizer.json or model dir>")
        return Tokenizer.load(path)
    if kind == "char":
        chars: set[str] = set()
        for batch in source.batches(doc_ends=False):
            for text in batch:
                chars.update(text)
        return Tokenizer.char_level(chars)
    if kind == "bpe":
        if vocab_size is None:
            raise GPTError("data.tokenizer=bpe needs data.vocab_size (e.g. 2048)")
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise GPTError(f"data.vocab_size must be a positive number of BPE tokens, e.g. 2048 (got {vocab_size!r})")
        tok = Tokenizer.train_bpe(source.batches(doc_ends=False), vocab_size)
        if tok.vocab_size < vocab_size:  # BpeTrainer stops when no pair of tokens occurs twice
            log.info(
                "BPE: %d tokens, not the %d asked for: the corpus has no more merges to learn",
                tok.vocab_size,
                vocab_size,
            )
        return tok
    raise GPTError(f"data.tokenizer must be char, bpe or file (got {kind!r})")


def prepare_corpus(
    source: TextSource,
    cache_dir: str | Path,
    name: str,
    tokenizer: str = "char",
    vocab_size: Optional[int] = None,
    tokenizer_path: Optional[str] = None,
    val_fraction: float = 0.1,
    dtype: str = "auto",
) -> TokenStore:
    """Tokenize the corpus once into `cache_dir/<name>-<key>/` (or reuse it) and return the store."""
    if not (0.0 < val_fraction < 1.0):
        raise GPTError(f"data.val_fraction must be in (0, 1) (got {val_fraction})")
    if vocab_size is not None and tokenizer != "bpe":  # e.g. data=hub (vocab_size 8192) data.tokenizer=char
        log.warning(
            "data.vocab_size=%s is not used: it sizes a BPE vocabulary to learn, and data.tokenizer=%s %s",
            vocab_size,
            tokenizer,
            "takes one token per character of the corpus"
            if tokenizer == "char"
            else "uses the vocabulary of the given tokenizer",
        )
    tokenizer_file = None
    if tokenizer_path:
        if not Path(tokenizer_path).exists():
            raise GPTError(
                f"data.tokenizer_path={tokenizer_path} does not exist; point it at a tokenizer.json or a "
                "model directory holding one"
            )
        tokenizer_file = (
            Path(tokenizer_path) / TOKENIZER_FILE if Path(tokenizer_path).is_dir() else Path(tokenizer_path)
        )
        if not tokenizer_file.is_file():
            raise GPTError(
                f"data.tokenizer_path={tokenizer_path} is a directory without a {TOKENIZER_FILE}; point it "
                "at a tokenizer.json or a model directory holding one (e.g. a run's checkpoints/best)"
            )
    spec = {
        "version": STORE_VERSION,
        "source": source.fingerprint(),
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "val_fraction": val_fraction,
        "dtype": dtype,
        "tokenizer_file": sha256_file(tokenizer_file) if tokenizer_file else None,
    }
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    final = Path(cache_dir) / f"{name}-{key}"
    if (final / "meta.json").is_file():
        return warn_unknown(TokenStore(final))

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        source.open()
        tok = build_tokenizer(source, tokenizer, vocab_size, tokenizer_path)
        np_dtype = token_dtype(tok.vocab_size, dtype)
        n, n_unknown, unknown = 0, 0, set()
        with open(tmp / "tokens.bin", "wb") as out:
            for batch in source.batches():
                ids = np.asarray([i for seq in tok.encode_batch(batch) for i in seq], dtype=np_dtype)
                ids.tofile(out)
                n += len(ids)
                if tok.unk_id is not None:  # a fixed char vocabulary meeting characters it was not built from
                    hits = int(np.count_nonzero(ids == tok.unk_id))
                    if hits and len(unknown) < 20:
                        unknown.update(*(tok.unknown_chars(text) for text in batch))
                    n_unknown += hits
        if n == 0:
            raise GPTError("the corpus holds no text; point data.path at a file with text")
        tok.save(tmp / "tokenizer.json")
        meta = {
            **spec,
            "name": name,
            "n_tokens": n,
            "n_train": int(n * (1 - val_fraction)),
            "dtype": np_dtype.name,
            "vocab_size_actual": tok.vocab_size,
            "tokenizer_kind": tok.kind,
            "n_unknown": n_unknown,
            "unknown_chars": "".join(sorted(unknown)[:20]),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.replace(tmp, final)  # atomic: a reader sees no store or a whole one
        except OSError:
            if not (final / "meta.json").is_file():  # not someone else's finished store: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return warn_unknown(TokenStore(final))


def warn_unknown(store: TokenStore) -> TokenStore:
    """Say so (on every run, cached store or not) when a fixed char vocabulary turned text into <|unk|>."""
    n_unknown, n = store.meta.get("n_unknown", 0), store.meta["n_tokens"]
    if n_unknown:
        log.warning(
            "%d of %d tokens (%.2f%%) are characters the tokenizer has never seen (%s); they train as %s. "
            "To keep them, build the vocabulary from this corpus (data.tokenizer=char) or use BPE",
            n_unknown,
            n,
            100 * n_unknown / n,
            repr(store.meta.get("unknown_chars", "")),
            UNK,
        )
    return store


# ----------------------------------------------------------------------------------------------------
# Batches


class RandomWindows(IterableDataset):
    """Batches of random (input, next-token) windows from one split.

    One optimizer step consumes a global batch of batch_size * world_size * accumulate windows, drawn from
    an RNG seeded with (seed, step) alone; micro-batch a of rank r takes its own slice of it. So:
      - a run resumed at step s sees exactly the batches the uninterrupted run would have;
      - each data-parallel rank reads different windows;
      - the data do not depend on how the global batch is split: 2 ranks x batch B, 1 rank x B with
        accumulate 2, and 1 rank x 2B train on the same windows at every step.
    Iteration counts micro-batches: micro-batch i is step i // accumulate, part i % accumulate.
    """

    def __init__(
        self,
        path,
        dtype,
        offset,
        n_tokens,
        block_size,
        batch_size,
        seed,
        rank=0,
        start=0,
        stop=None,
        world_size=1,
        accumulate=1,
    ):
        if not 0 <= rank < world_size or accumulate < 1:
            raise ValueError(
                f"need 0 <= rank < world_size and accumulate >= 1 (got {rank}, {world_size}, {accumulate})"
            )
        self.path, self.dtype, self.offset, self.n_tokens = str(path), np.dtype(dtype), offset, n_tokens
        self.block_size, self.batch_size, self.seed, self.rank = block_size, batch_size, seed, rank
        self.world_size, self.accumulate = world_size, accumulate
        self.start, self.stop = start, stop

    def __len__(self):
        # Batches in the whole run, counting those an interrupted run already drew (the stream starts at
        # `start`): on resume Lightning restores its batch counter and compares it with this length, and
        # would end the epoch early, restarting the stream, against the shorter remainder.
        if self.stop is None:
            raise TypeError("endless stream")
        return self.stop

    def __iter__(self):
        data = np.memmap(
            self.path, dtype=self.dtype, mode="r", offset=self.offset * self.dtype.itemsize, shape=(self.n_tokens,)
        )
        window = np.arange(self.block_size + 1)
        B, parts = self.batch_size, self.world_size * self.accumulate
        # With DataLoader workers each one makes every num_workers-th micro-batch, and the DataLoader takes
        # them from the workers in turn: the same sequence as without workers, each batch once.
        worker = torch.utils.data.get_worker_info()
        i, stride = (self.start + worker.id, worker.num_workers) if worker else (self.start, 1)
        while self.stop is None or i < self.stop:
            step, micro = divmod(i, self.accumulate)
            rng = np.random.default_rng([self.seed, 0, step])  # the 0 keeps one-process batches as they were
            starts = rng.integers(0, self.n_tokens - self.block_size, size=B * parts)
            part = micro * self.world_size + self.rank
            starts = starts[part * B : (part + 1) * B]
            chunk = torch.from_numpy(data[starts[:, None] + window].astype(np.int64))  # one gather from the memmap
            yield {"input_ids": chunk[:, :-1], "labels": chunk[:, 1:]}
            i += stride


class FixedWindows(Dataset):
    """The same `n_batches` validation batches at every evaluation, so val losses are comparable."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, n_batches: int, seed: int):
        rng = np.random.default_rng([seed, 2**31 - 1])
        starts = rng.integers(0, len(tokens) - block_size, size=(n_batches, batch_size))
        self.windows = torch.from_numpy(tokens[starts[..., None] + np.arange(block_size + 1)].astype(np.int64))

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        return {"input_ids": self.windows[i, :, :-1], "labels": self.windows[i, :, 1:]}


class TextDataModule(L.LightningDataModule):
    """A pretraining corpus as a LightningDataModule. See configs/data/*.yaml for the options."""

    def __init__(
        self,
        name: str,
        block_size: int,
        batch_size: int,
        path: Optional[str] = None,
        relpath: Optional[str] = None,
        url: Optional[str] = None,
        sha256: Optional[str] = None,
        hub: Optional[dict] = None,
        tokenizer: str = "char",
        vocab_size: Optional[int] = None,
        tokenizer_path: Optional[str] = None,
        val_fraction: float = 0.1,
        dtype: str = "auto",
        eval_batches: int = 20,
        seed: int = 1337,
        cache_dir: str = ".cache/gpt",
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        super().__init__()
        self.name, self.block_size, self.batch_size = name, block_size, batch_size
        self.path, self.relpath, self.url, self.sha256, self.hub = path, relpath, url, sha256, hub
        self.tokenizer_kind, self.vocab_size, self.tokenizer_path = tokenizer, vocab_size, tokenizer_path
        self.val_fraction, self.dtype, self.eval_batches, self.seed = val_fraction, dtype, eval_batches, seed
        check_num_workers(num_workers, "data.num_workers")
        self.cache_dir, self.num_workers, self.pin_memory = cache_dir, num_workers, pin_memory
        self.store: Optional[TokenStore] = None
        for k in ("batch_size", "block_size", "eval_batches"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) <= 0:
                raise GPTError(f"data.{k} must be a positive integer (got {getattr(self, k)!r})")

    def prepare_data(self) -> None:
        if self.store is not None:
            return
        if self.hub and not self.path:
            source = TextSource(hub=dict(self.hub))
        else:
            files = resolve_files(self.path, self.relpath, self.url, self.sha256, self.name)
            check_text_files(files)
            source = TextSource(files=files)
        with storage_errors(self.cache_dir, "point GPT_CACHE_DIR (or data.cache_dir) at another disk"):
            self.store = prepare_corpus(
                source,
                self.cache_dir,
                self.name,
                self.tokenizer_kind,
                self.vocab_size,
                self.tokenizer_path,
                self.val_fraction,
                self.dtype,
            )
        for split in ("train", "val"):
            n = self.store.split_range(split)[1]
            if n <= self.block_size:
                raise GPTError(
                    f"the corpus is too short: its {split} split has {n} tokens, fewer than one block "
                    f"(block_size {self.block_size} + 1); use more text, a smaller model.block_size, "
                    f"or a different data.val_fraction"
                )

    def setup(self, stage: Optional[str] = None) -> None:
        self.prepare_data()  # every rank opens the (already built) store

    @property
    def tokenizer(self) -> Tokenizer:
        self.prepare_data()
        return self.store.tokenizer

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        start, stop, rank, world_size, accumulate = 0, None, 0, 1, 1
        if trainer is not None:
            # Resume: continue at the batch the interrupted run would have drawn next.
            start = trainer.global_step * trainer.accumulate_grad_batches
            if trainer.max_steps and trainer.max_steps > 0:
                stop = trainer.max_steps * trainer.accumulate_grad_batches
            rank, world_size, accumulate = trainer.global_rank, trainer.world_size, trainer.accumulate_grad_batches
        offset, n = self.store.split_range("train")
        ds = RandomWindows(
            self.store.path,
            self.store.dtype,
            offset,
            n,
            self.block_size,
            self.batch_size,
            self.seed,
            rank=rank,
            start=start,
            stop=stop,
            world_size=world_size,
            accumulate=accumulate,
        )
        return DataLoader(ds, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory)

    def val_dataloader(self) -> DataLoader:
        ds = FixedWindows(self.store.tokens("val"), self.block_size, self.batch_size, self.eval_batches, self.seed)
        return DataLoader(ds, batch_size=None, pin_memory=self.pin_memory)
