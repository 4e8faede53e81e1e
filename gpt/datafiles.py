"""Where data comes from: an explicit path or glob, `$GPT_DATA_DIR/<relpath>` (default ./data), or a download
from a URL checked against its sha256. The named datasets' files are listed in KNOWN_FILES, so a recipe on a
fresh machine fetches what it needs; offline, one line says where to put each file. Hub datasets open
through `datasets`, offline from the local cache when the hub cannot be reached.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from glob import escape, glob
from pathlib import Path
from typing import Optional

from gpt.atomic import atomic_file
from gpt.errors import GPTError

DATA_DIR_ENV = "GPT_DATA_DIR"

# The named datasets' files: where each comes from and its sha256. A file missing under $GPT_DATA_DIR is
# downloaded from here and checked before anything reads it.
PAIRS_URL = "https://raw.githubusercontent.com/harsh19/Shakespearizing-Modern-English/master/data/"
KNOWN_FILES = {
    "tinyshakespeare/input.txt": (
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    ),
    # Jhamtani et al. 2017, "Shakespearizing Modern Language Using Copy-Enriched Sequence-to-Sequence Models"
    "shakespeare_modern/train.modern": (
        PAIRS_URL + "train.modern.nltktok",
        "ff73ae895942fd2e45115a04365dc3ee85fc45dded4a49377c10a4b71adab7e8",
    ),
    "shakespeare_modern/train.original": (
        PAIRS_URL + "train.original.nltktok",
        "50949f40c99e6892fae0965287c24d457588fcf34f677852f3b80ecb9dbdd295",
    ),
    "shakespeare_modern/valid.modern": (
        PAIRS_URL + "valid.modern.nltktok",
        "465a3b50335337a3ec3b0de414343c5cf38496901c16babf91f8b507905dff71",
    ),
    "shakespeare_modern/valid.original": (
        PAIRS_URL + "valid.original.nltktok",
        "45b9e26c70f885bc43aa21c1a5b4d1698a3e13d44a5747c53dcdfd89ebaefee4",
    ),
}


def fetch_known(path: Path, name: str) -> bool:
    """Download `path` if it is one of KNOWN_FILES under $GPT_DATA_DIR and missing; whether it was one."""
    try:
        relpath = Path(path).resolve().relative_to(data_dir().resolve()).as_posix()
    except ValueError:
        return False
    if relpath not in KNOWN_FILES:
        return False
    if not Path(path).is_file():
        url, sha256 = KNOWN_FILES[relpath]
        download(url, Path(path), sha256, name)
    return True


def data_dir() -> Path:
    """Where named datasets live: $GPT_DATA_DIR, default ./data."""
    return Path(os.environ.get(DATA_DIR_ENV, "data"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# Finding the corpus


def resolve_files(
    path: Optional[str] = None,
    relpath: Optional[str] = None,
    url: Optional[str] = None,
    sha256: Optional[str] = None,
    name: str = "corpus",
) -> list[Path]:
    """The corpus files, in this order of preference: an explicit path or glob (`path`);
    `$GPT_DATA_DIR/<relpath>`; a download from `url` into `$GPT_DATA_DIR/<relpath>`, checked against `sha256`.
    `path` and `relpath` may also be lists (several files make one corpus, in the order given).
    """
    for many in (path, relpath):
        if many and not isinstance(many, (str, os.PathLike)):  # a list (or Hydra ListConfig) of paths
            if url or sha256:
                raise GPTError(f"{name}: url/sha256 describe one file; drop them when listing several files")
            key = "path" if many is path else "relpath"
            return [f for one in many for f in resolve_files(**{key: one}, name=name)]
    if path:
        literal = Path(os.path.expanduser(str(path)))
        if literal.is_file():  # a file whose name holds glob characters ([, ], *, ?) is that file, not a pattern
            return [literal]
        files = sorted(Path(p) for p in glob(os.path.expanduser(str(path)), recursive=True))
        files = [f for f in files if f.is_file()]
        if not files:
            if literal.exists() and not literal.is_dir():
                raise GPTError(
                    f"data.path={path!r} is not a regular file (a pipe, device or socket); write the corpus "
                    "to a file first"
                )
            if literal.is_dir():
                raise GPTError(
                    f"data.path={path!r} is a directory; name its files with a glob, e.g. "
                    f"data.path='{escape(str(path).rstrip('/'))}/*.txt'"
                )
            raise GPTError(f"no corpus file matches data.path={path!r}: check the path (globs like 'dir/*.txt' work)")
        return files
    if not relpath:
        raise GPTError(f"dataset {name!r} has no files: set data.path=<file or glob>")
    url, sha256 = (url, sha256) if url or sha256 else KNOWN_FILES.get(str(relpath), (None, None))
    local = data_dir() / relpath
    if not local.is_file():
        if url:
            download(url, local, sha256, name)
        elif not fetch_known(local, name):
            raise GPTError(f"{name}: {local} not found; put the file there or set {DATA_DIR_ENV} / data.path")
    if sha256:
        actual = sha256_file(local)
        if actual != sha256:
            raise GPTError(
                f"{local} is not the expected {name} file (sha256 {actual[:12]}…, expected {sha256[:12]}…); "
                "delete it to re-download, or pass your own text with data.path=<file>"
            )
    return [local]


def download(url: str, dest: Path, sha256: Optional[str], name: str) -> None:
    """`url` into `dest` (created whole or not at all), checked against `sha256`; offline: one line saying where to
    put the file by hand."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=30) as r:
            payload = r.read()
    except Exception as e:
        raise GPTError(
            f"{name} is not at {dest} and downloading {url} failed ({type(e).__name__}: {e}); "
            f"offline? copy the file to {dest} (or set {DATA_DIR_ENV} to the folder that holds it)"
        ) from e
    if sha256 and hashlib.sha256(payload).hexdigest() != sha256:
        raise GPTError(
            f"download of {url} does not match its sha256 {sha256[:12]}…; try again or copy the file by hand"
        )
    with atomic_file(dest) as f:  # a temp name of our own, renamed into place: never a user's file
        f.write(payload)


def hub_reachable() -> bool:
    """Whether the Hugging Face hub's host name resolves: a machine without a network fails this at once.
    Behind a proxy the proxy resolves it, so then the hub counts as reachable."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    proxies = urllib.request.getproxies()
    if proxies.get("https") or proxies.get("all"):
        return True
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
    except (OSError, UnicodeError):
        return False
    return True


def load_hub_dataset(name: str, config: Optional[str], split: str, *, streaming: bool = False, instead: str):
    """datasets.load_dataset for a hub dataset; `instead` says what to use if it cannot be opened.

    Where the hub cannot be reached, the call runs in the libraries' offline mode: a copy in the local cache
    still loads, and a missing one fails at once instead of after huggingface_hub's five retries (~23 s).
    """
    import datasets
    from huggingface_hub import constants

    online = constants.HF_HUB_OFFLINE is False and hub_reachable()
    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    try:
        if not online:
            datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if not online:
            raise GPTError(
                f"hub dataset {name!r} (split {split!r}) is not in the local cache and the hub cannot be "
                f"reached from here ({why}); download it on a machine with a network, or {instead}"
            ) from e
        raise GPTError(
            f"could not open hub dataset {name!r} split {split!r} ({why}); check the name, "
            f"config and split on huggingface.co, or {instead}"
        ) from e
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved
