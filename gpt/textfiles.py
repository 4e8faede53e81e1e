"""Users' text files (corpora, prompt files, task files), read the way `datasets`' text loader reads a corpus:
UTF-8 (a binary or other-encoded file is refused up front, naming it), universal newlines, no byte-order mark,
and lines as `wc -l` counts them. Kept apart from gpt.data so that sample.py reads its files without
importing Lightning.
"""

from __future__ import annotations

import codecs
from pathlib import Path

from gpt.errors import GPTError


def read_text(path: Path) -> str:
    r"""A UTF-8 text file as `datasets`' text loader reads a corpus: universal newlines (\r\n and \r become
    \n), without a leading byte-order mark."""
    return Path(path).read_text(encoding="utf-8").removeprefix("\ufeff")


def split_lines(text: str) -> list[str]:
    r"""Lines as files count them (`wc -l`, `datasets`, sacrebleu): split at \n only, not at the other
    characters str.splitlines() takes for line breaks (U+2028, form feed, ...), which can be inside a line."""
    lines = text.split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def check_text_files(files: list[Path], allow_empty: bool = False) -> None:
    """Refuse binary and non-UTF-8 files (and, for a corpus, an empty one) up front, naming the file (one fast
    streaming read)."""
    total = 0
    for f in files:
        size = f.stat().st_size
        total += size
        with open(f, "rb") as fh:
            head = fh.read(8192)
            if b"\x00" in head:
                raise GPTError(f"{f} looks binary (it contains NUL bytes); it must be UTF-8 text")
            fh.seek(0)
            decoder = codecs.getincrementaldecoder("utf-8")()
            offset = 0
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as e:
                    raise GPTError(
                        f"{f} is not UTF-8 text (bad byte at offset {offset + e.start}); convert it, e.g. "
                        f"`iconv -f latin1 -t utf-8 {f} > {f.stem}.utf8.txt`"
                    ) from None
                offset += len(chunk)
    if total == 0 and not allow_empty:
        raise GPTError(f"the corpus is empty ({', '.join(map(str, files))}); point data.path at a file with text")
