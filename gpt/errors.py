"""User-facing errors.

A `GPTError` is a mistake the user can fix (a wrong path, an impossible shape, a bad option). The entry
points print its message as one line and exit non-zero; any other exception is a bug and keeps its
traceback. Messages say what is wrong *and* what to do about it.
"""

import contextlib
import errno
import math
import re


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
