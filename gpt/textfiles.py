"""Users' text files (prompt files, task files; the checks also for corpora): UTF-8 (a binary or other-encoded
file is refused up front, naming it), no byte-order mark, and lines as `wc -l` counts them. Kept apart from
gpt.data so that sample.py reads its files without importing Lightning.
"""

from __future__ import annotations

import codecs
from pathlib import Path

from gpt.atomic import atomic_file
from gpt.errors import GPTError, storage_errors


def read_text(path: Path) -> str:
    r"""A UTF-8 text file's text, under the text rule (`user_text`)."""
    with open(path, encoding="utf-8", newline="") as f:
        return user_text(f.read(), str(path))


def user_text(text: str, what: str) -> str:
    r"""The one text rule, for every text a user hands us (files, prompts, chat lines, HTTP fields): \r\n line
    ends read as \n, a lone \r kept (it ends no line for `wc -l`), a leading byte-order mark dropped, and a lone
    surrogate (what JSON's "\ud800" or undecodable bytes become in Python) refused by name: it is not text, and
    no tokenizer or file can hold it. (Bytes that are not UTF-8 are refused where bytes are read: `decode_line`,
    `check_text_files`.)"""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise GPTError(
            f"{what} holds a lone surrogate (U+{ord(text[e.start]):04X} at character {e.start}), which is not "
            "text: send UTF-8 text (in JSON, a \\ud800-\\udfff escape only as half of a pair)"
        ) from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def decode_line(line: bytes, what: str) -> str:
    """A line of bytes (a chat REPL line) as text under the text rule; bytes that are not UTF-8 refused as a
    file's are, naming the offset."""
    try:
        return user_text(line.decode("utf-8"), what)
    except UnicodeDecodeError as e:
        raise GPTError(
            f"{what} is not UTF-8 text (bad byte 0x{line[e.start]:02x} at offset {e.start}); "
            "use a UTF-8 terminal, or convert the input, e.g. `iconv -f latin1 -t utf-8`"
        ) from None


def split_lines(text: str) -> list[str]:
    r"""Lines as `wc -l` counts them: split at \n only, not at a lone \r or the other characters
    str.splitlines() takes for line breaks (U+2028, form feed, ...), which can be inside a line. A last line
    without \n is a line too."""
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
            bom = head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
            alternating = max(head[0::2].count(0), head[1::2].count(0)) > len(head) // 4  # NUL in every other byte
            if bom or (len(head) >= 4 and alternating):  # what UTF-16 makes of mostly-ASCII text, BOM or not
                raise GPTError(
                    f"{f} is UTF-16 text, not UTF-8; convert it, e.g. "
                    f"`iconv -f utf-16 -t utf-8 {f} > {f.stem}.utf8.txt`"
                )
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


def write_lines_atomically(path: Path, lines: list[str], overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise GPTError(f"{path} exists; choose another output_file or pass overwrite=true")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f, storage_errors(path, "choose an output_file on another disk"):
        f.write("".join(line + "\n" for line in lines).encode("utf-8"))


def read_text_file(path: str | Path) -> str:
    """A prompt file's text, read as a corpus is (a byte-order mark dropped); a binary or non-UTF-8 file is
    refused as a corpus file is, and so is a path that is no file."""
    if not Path(path).exists():
        raise GPTError(f"{path} does not exist; give a UTF-8 text file")
    check_text_files([Path(path)], allow_empty=True)
    return read_text(Path(path))
