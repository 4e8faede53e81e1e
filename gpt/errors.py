"""User-facing errors.

A `GPTError` is a mistake the user can fix (a wrong path, an impossible shape, a bad option). The entry
points print its message as one line and exit non-zero; any other exception is a bug and keeps its
traceback. Messages say what is wrong *and* what to do about it.
"""

import contextlib
import difflib
import errno
import json
import math
import re
from pathlib import Path


class GPTError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""


def is_int(x) -> bool:
    """An integer setting's value (True/False are ints to Python, not to a user)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_finite(x) -> bool:
    """A number a setting can mean: not NaN (which passes every `x < limit` check by failing none) nor ±inf."""
    return is_number(x) and math.isfinite(x)


def check_seed(value, key: str = "seed") -> None:
    """A seed every RNG takes (numpy's is the narrowest: 0 .. 2**32 - 1)."""
    if not is_int(value) or not 0 <= value < 2**32:
        raise GPTError(f"{key} must be a whole number from 0 to {2**32 - 1} (got {value!r})")


def check_num_workers(value, key: str) -> None:
    if not is_int(value) or value < 0:
        raise GPTError(f"{key} must be a whole number >= 0 (got {value!r}); 0 loads batches in the main process")


def _disk_full(error: BaseException) -> bool:
    """Whether `error` (or what caused it) is a full disk or quota. torch.save reports the OSError as a
    RuntimeError whose __context__ is the OSError; safetensors as text ending in "(os error 28)"."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if re.search(rf"os error ({errno.ENOSPC}|{errno.EDQUOT})\b", str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def storage_errors(path, elsewhere: str = "write elsewhere (e.g. hydra.run.dir=/other/disk/run)"):
    """A full disk while writing `path` becomes a GPTError that says so. Use it around writers that leave the
    previous version in place (temporary name + rename), so the message can promise that."""
    try:
        yield
    except GPTError:
        raise  # already says what to do (an inner storage_errors, or another mistake)
    except Exception as e:
        if _disk_full(e):
            raise GPTError(
                f"no space left on device writing {path}; free some space or {elsewhere}; "
                "the previous version is intact"
            ) from e
        raise


# ----------------------------------------------------------------------------------------------------
# JSON files: every one we read goes through parse_json (a JSON text we are handed is a value of any shape)

MAX_JSON_DEPTH = 64  # arrays/objects inside each other; none of our files, nor a chat row, comes near it
TOO_DEEP = f"nested too deeply (JSON arrays/objects more than {MAX_JSON_DEPTH} levels deep)"
JSON_TYPES = ((dict, "an object"), (list, "an array"), (str, "a string"), (bool, "true/false"), (type(None), "null"))


def json_type(value) -> str:
    """What a JSON value is, in the words of JSON: 'an object', 'an array', 'a number', ..."""
    return next((name for kind, name in JSON_TYPES if isinstance(value, kind)), "a number")


class BadJSON(ValueError):
    """What is wrong with a JSON text, without its place or a fix (parse_json's refusal). `kind`: the
    underlying error's name (JSONDecodeError, RecursionError, ...), `line`: the text's line, when known."""

    def __init__(self, problem: str, kind: str = "ValueError", line: int | None = None):
        super().__init__(problem)
        self.kind, self.line = kind, line


def _not_unicode(text: str) -> bool:
    """A string with a lone surrogate (JSON's "\\ud800" escape): no UTF-8 text, nothing a tokenizer takes."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _shape_problem(value, limit: int) -> str | None:
    """What no reader of a JSON value can take: nesting past `limit`, or a string (or key) that is not Unicode
    text. Walked without recursion."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str) and _not_unicode(node):
            return f"holds a string that is not Unicode text (a lone surrogate escape such as \\ud800 in {node!r:.40})"
        if isinstance(node, (dict, list)):
            if depth > limit:
                return TOO_DEEP
            if isinstance(node, dict):
                stack.extend((key, depth) for key in node)
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return None


def parse_json(text: str | bytes, top: type | tuple | None = dict):
    """A JSON text -> its value, or BadJSON: not JSON, not UTF-8, nested deeper than MAX_JSON_DEPTH (json.loads
    itself gives up with a RecursionError at about a thousand levels), or (`top`) a top level of another type."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        text = text.removeprefix("\ufeff")  # a byte-order mark (Windows editors) is no mistake
        value = json.loads(text)
    except json.JSONDecodeError as e:
        where = f"at line {e.lineno} column {e.colno}"
        raise BadJSON(f"not valid JSON ({e.msg} {where})", "JSONDecodeError", e.lineno) from None
    except UnicodeDecodeError as e:
        raise BadJSON(f"not UTF-8 text (bad byte at offset {e.start})", "UnicodeDecodeError") from None
    except RecursionError:
        raise BadJSON(TOO_DEEP, "RecursionError") from None
    except ValueError:  # a number of more than 4300 digits (Python's int limit; its wording differs by version)
        raise BadJSON("not valid JSON (a number longer than Python's 4300-digit limit)") from None
    problem = _shape_problem(value, MAX_JSON_DEPTH)
    if problem:
        raise BadJSON(problem, "RecursionError" if problem == TOO_DEEP else "UnicodeEncodeError")
    if top is not None and not isinstance(value, top):
        kinds = top if isinstance(top, tuple) else (top,)
        want = " or ".join(next((name for kind, name in JSON_TYPES if kind is t), "a number") for t in kinds)
        raise BadJSON(f"holds {json_type(value)} where {want} belongs", "TypeError")
    return value


def loads_json(text: str | bytes, where: str, fix: str, top: type | tuple | None = dict):
    """parse_json, with any problem as one GPTError line: '<where>: <problem>; <fix>'."""
    try:
        return parse_json(text, top)
    except BadJSON as e:
        raise GPTError(f"{where}: {e}; {fix}") from None


def read_json(path, fix: str, top: type | tuple | None = dict):
    """A JSON file's value (see parse_json); an unreadable file is one GPTError line too."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise GPTError(f"cannot read {path} ({e.strerror or e}); {fix}") from None
    return loads_json(data, str(path), fix, top)


def unknown_keys(record: dict, known, where: str, fix: str) -> None:
    """Refuse a key of one of our own files that we do not know (a typo would be silently ignored), naming
    the nearest known one."""
    unknown = [k for k in record if k not in known]
    if not unknown:
        return
    names = [str(k) for k in known]
    close = difflib.get_close_matches(str(unknown[0]), names, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(sorted(names))})"
    more = f" and {len(unknown) - 1} more ({', '.join(repr(k) for k in unknown[1:4])})" if len(unknown) > 1 else ""
    raise GPTError(f"{where} has an unknown key {unknown[0]!r}{hint}{more}; {fix}")
