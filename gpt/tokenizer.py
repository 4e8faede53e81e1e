"""Tokenizers, through Hugging Face `tokenizers`, saved as `tokenizer.json` beside every model.

Two kinds are built from a corpus: character-level (one token per character seen in the corpus) and
byte-level BPE (GPT-2's scheme) trained to a chosen vocabulary size. Any `tokenizer.json` (for example
GPT-2's own) loads the same way. Every tokenizer has the end-of-text token `<|endoftext|>`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Iterator, Optional

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from gpt.errors import GPTError

EOS = "<|endoftext|>"
UNK = "<|unk|>"  # char-level only: characters the corpus never showed
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    """Text <-> token ids. Wraps a `tokenizers.Tokenizer`; `hf` is the wrapped object."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        self.eos_id = hf.token_to_id(EOS)
        self.unk_id = hf.token_to_id(UNK)

    # -- building ------------------------------------------------------------------------------------

    @classmethod
    def char_level(cls, chars: Iterable[str]) -> "Tokenizer":
        """One token per character (sorted, so the same corpus always gives the same ids)."""
        vocab = {c: i for i, c in enumerate(sorted(set(chars)))}
        for special in (EOS, UNK):
            vocab[special] = len(vocab)
        hf = HFTokenizer(models.WordLevel(vocab, unk_token=UNK))
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char alone
        hf.decoder = decoders.Fuse()  # join the pieces with nothing in between
        hf.add_special_tokens([EOS, UNK])
        return cls(hf)

    @classmethod
    def train_bpe(
        cls, batches: Iterator[list[str]], vocab_size: int, length: Optional[int] = None, show_progress: bool = True
    ) -> "Tokenizer":
        """Byte-level BPE: any text is representable (no unknown tokens), merges learned from `batches`."""
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + 1:
            raise GPTError(f"BPE vocab_size must be at least {len(alphabet) + 1} (256 bytes + {EOS}); got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=alphabet, show_progress=show_progress
        )
        hf.train_from_iterator(batches, trainer=trainer, length=length)
        return cls(hf)

    @classmethod
    def from_gpt2_files(
        cls, vocab_file: str | Path, merges_file: str | Path, add_prefix_space: bool = False
    ) -> "Tokenizer":
        """GPT-2's original tokenizer files (vocab.json + merges.txt): byte-level BPE, like `train_bpe`."""
        try:
            hf = HFTokenizer(models.BPE.from_file(str(vocab_file), str(merges_file)))
        except Exception as e:  # the Rust side raises plain Exception for malformed files
            raise GPTError(f"{vocab_file} + {merges_file} are not a valid BPE vocabulary ({e})") from e
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
        hf.decoder = decoders.ByteLevel()
        if hf.token_to_id(EOS) is not None:
            hf.add_special_tokens([EOS])  # so that "<|endoftext|>" in text is one token, as in GPT-2
        return cls(hf)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """From a tokenizer.json file or a directory holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise GPTError(f"no tokenizer at {path}: expected a {TOKENIZER_FILE} beside the model")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # the Rust side raises plain Exception for malformed files
            raise GPTError(
                f"{path} is not a valid tokenizer.json ({e}); use a tokenizer.json saved by Hugging Face "
                "tokenizers (a model directory's own: re-export the model)"
            ) from e

    @classmethod
    def from_str(cls, s: str, source: str = "the tokenizer") -> "Tokenizer":
        try:
            return cls(HFTokenizer.from_str(s))
        except Exception as e:  # the Rust side raises plain Exception for malformed text
            raise GPTError(
                f"{source} is not a valid Hugging Face tokenizer ({str(e)[:150]}); re-export the model "
                "from another checkpoint"
            ) from e

    def to_str(self) -> str:
        return self.hf.to_str()

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        self.hf.save(str(path))

    # -- using ---------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def kind(self) -> str:
        return {"WordLevel": "char", "BPE": "bpe"}.get(type(self.hf.model).__name__, type(self.hf.model).__name__)

    def unknown_chars(self, text: str) -> set[str]:
        """The characters of `text` a char-level tokenizer has no token for (they encode as <|unk|>); none for
        BPE, which spells anything in bytes."""
        if self.unk_id is None:
            return set()
        return {c for c in set(text) if self.hf.token_to_id(c) is None}

    def encode(self, text: str, strict: bool = False) -> list[int]:
        """Token ids of `text`. strict: refuse characters a char-level tokenizer has never seen."""
        ids = self.hf.encode(text, add_special_tokens=False).ids
        if strict and self.unk_id is not None and self.unk_id in ids:
            unknown = sorted(self.unknown_chars(text))
            raise GPTError(
                f"text contains characters the tokenizer has never seen: {''.join(unknown)!r}; "
                "remove them, use a model trained on a corpus that has them (or a BPE tokenizer), or read them as "
                "<|unk|> as fine-tuning does (sample.py unknown_chars=unk)"
            )
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def byte_lengths(self) -> list[int]:
        """How many UTF-8 bytes of text each token id stands for (bits per byte divides by their sum).

        Special tokens (<|endoftext|>, <|unk|>, ...) stand for no text: 0. A byte-level BPE token spells each
        byte as one character (GPT-2's byte-to-unicode map), so its length is its byte count, whole characters
        or not; a byte-fallback token (<0x0A>) is one byte; any other token (characters, sentencepiece pieces
        with ▁ for a space) is its text in UTF-8. Computed from the vocabulary, once per tokenizer."""
        spec = json.loads(self.to_str())
        model = spec.get("model") or {}
        byte_level = '"ByteLevel"' in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
        added = {t["id"]: t for t in spec.get("added_tokens", [])}
        lengths = []
        for i in range(self.vocab_size):
            token = self.hf.id_to_token(i)
            if token is None or added.get(i, {}).get("special"):
                lengths.append(0)
            elif i in added:  # an added non-special token matches its text as it is
                lengths.append(len(token.encode("utf-8")))
            elif byte_level:
                lengths.append(len(token))
            elif model.get("byte_fallback") and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
                lengths.append(1)
            else:
                lengths.append(len(token.replace("\u2581", " ").encode("utf-8")))
        return lengths
