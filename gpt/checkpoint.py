"""Model directories on disk, and loading a model from one (or from a Lightning .ckpt).

An exported model directory holds three files, readable without Lightning:

    config.json         GPTConfig fields
    model.safetensors   the weights (safetensors: no pickle, no code)
    tokenizer.json      the Hugging Face tokenizer

Directories are written under a temporary name and renamed into place, so an interrupted export never
leaves a half-written model where a complete one was. Lightning `.ckpt` files are read with
`torch.load(weights_only=True)`: tensors and plain containers only, never arbitrary pickled objects.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import uuid
import warnings
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from gpt.config import GPTConfig
from gpt.errors import GPTError, read_json, storage_errors
from gpt.jsonfiles import check_model_record
from gpt.model import GPT
from gpt.tokenizer import TOKENIZER_FILE, Tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"  # what PEFT writes beside LoRA weights: an adapter, not a model
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"  # PEFT's LoRA weights
RECORD_FILE = "gpt_adapter.json"  # ours, beside PEFT's files: the adapter's base and task (gpt.adapter)
TIED = ("lm_head.weight",)  # the same tensor as transformer.wte.weight: stored once (unless untied)


def tied_keys(model: GPT) -> tuple[str, ...]:
    return TIED if model.config.tie_embeddings else ()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# Temporary and swap names are ours only when we can prove it: `.<name>.<kind>-<pid>-<uuid>` (kind tmp, new or old)
# for exactly the target's name, created with O_EXCL (a name that exists is never reused), and a directory
# also carries MARKER, which names the target and the same suffix. Cleanup and recovery match these names
# exactly (never a glob built from a user's file name) and touch nothing else: a user's `.X.old`, `.X.new` or
# `.X.tmp-anything` beside our files is left as it is.
MARKER = ".gpt-atomic"


def _new_suffix() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex}"  # the writer's pid: a leftover of a dead one can be told apart


def _own_name(path: Path, kind: str, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{suffix}")


def _parse_own(name: str, target: str, kind: str) -> Optional[tuple[int, str]]:
    """(writer pid, suffix) when `name` is one of our `kind` names for `target`, else None."""
    m = re.fullmatch(re.escape(f".{target}.{kind}-") + r"((\d+)-[0-9a-f]{32})", name)
    return (int(m.group(2)), m.group(1)) if m else None


def _marker_text(target: str, suffix: str) -> str:
    return f"gpt atomic_dir {target} {suffix}\n"


def _write_marker(directory: Path, target: str, suffix: str) -> None:
    (directory / MARKER).write_text(_marker_text(target, suffix))


def _marked(directory: Path, target: str, suffix: str) -> bool:
    """Whether `directory` is a real directory (not a link) that carries our marker for target/suffix."""
    try:
        return (
            not directory.is_symlink()
            and directory.is_dir()
            and (directory / MARKER).read_text() == _marker_text(target, suffix)
        )
    except (OSError, UnicodeDecodeError):
        return False


def _alive(pid: int) -> bool:
    """Whether process `pid` may still be writing (another user's process counts as alive: not ours to judge)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _siblings(path: Path, kind: str) -> list[tuple[Path, int, str]]:
    """Our `kind` names for `path` in its directory: (path, writer pid, suffix), by exact name."""
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    return [(path.with_name(n), *own) for n in names if (own := _parse_own(n, path.name, kind))]


def remove_stale_temps(directory: Path, name: str) -> None:
    """Delete what killed writers of `directory`/`name` left: half-written temporary files (our exact name,
    a regular file of this user) and temporary directories (with our marker, or empty). A temporary name
    whose writer is still alive, and anything that merely looks like one, is left alone."""
    for leftover, pid, suffix in _siblings(Path(directory) / name, "tmp"):
        if _alive(pid):
            continue
        with contextlib.suppress(OSError):
            st = leftover.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid():
                leftover.unlink()
            elif _marked(leftover, name, suffix):
                shutil.rmtree(leftover)
            elif stat.S_ISDIR(st.st_mode):
                leftover.rmdir()  # killed before its marker was written: only ever removed when empty


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a binary file opened on a temporary name beside `path`; when the block ends without error, the
    data is fsynced and the file renamed over `path` (one rename: readers see the old file or the new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)
    tmp = _own_name(path, "tmp", _new_suffix())
    # O_EXCL: never opens a file that is already there; mode 0o666 less the umask, like any file the user writes
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with storage_errors(path):
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        _fsync(path.parent)  # the rename itself survives a power cut
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def recover_dir(path: str | Path) -> Path:
    """Finish a directory replacement that a kill interrupted (see atomic_dir) and return where the
    directory is: `path`, or a complete sibling if `path` is missing and cannot be renamed back. Only a
    `.new` that carries our marker is adopted."""
    path = Path(path)
    if os.path.lexists(path):
        return path
    complete = sorted(
        ((p, pid) for p, pid, suffix in _siblings(path, "new") if _marked(p, path.name, suffix)),
        key=lambda c: c[0].stat().st_mtime,
    )
    if complete:  # the newest complete new version: it was complete before the swap began
        candidate, pid = complete[-1]
        if _alive(pid):  # its writer is mid-swap: read it where it is, leave the swap to the writer
            return candidate
        try:
            os.replace(candidate, path)
            return path
        except OSError:  # a read-only location: read it where it is
            return candidate
    return path


def _remove_swap_leftovers(path: Path) -> None:
    """After recover_dir: what killed swaps of `path` left. A `.old` is ours when a marker (in `path` or in a
    `.new`) names its suffix; a `.new` beside a present `path` is a swap killed before it began."""
    marks = {_marker_suffix(path)} | {
        suffix for new, _, suffix in _siblings(path, "new") if _marked(new, path.name, suffix)
    }
    for old, pid, suffix in _siblings(path, "old"):
        if suffix in marks and not _alive(pid) and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
    for new, pid, suffix in _siblings(path, "new"):
        if _marked(new, path.name, suffix) and not _alive(pid) and path.is_dir():
            shutil.rmtree(new, ignore_errors=True)
    suffix = _marker_suffix(path)
    # a swap killed just before it removed the marker
    if suffix and not _alive(int(suffix.split("-")[0])) and not path.is_symlink():
        (path / MARKER).unlink(missing_ok=True)


def _marker_suffix(directory: Path) -> Optional[str]:
    """The suffix our marker in `directory` names, if it carries one for its own name."""
    try:
        text = (directory / MARKER).read_text()
    except (OSError, UnicodeDecodeError):
        return None
    m = re.fullmatch(r"gpt atomic_dir (.+) (\d+-[0-9a-f]{32})\n", text, flags=re.S)
    return m.group(2) if m and m.group(1) == directory.name else None


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary directory beside `path`; on success it replaces `path`.

    POSIX cannot swap two directories in one rename, so the replacement is staged: the finished (and
    fsynced) temporary directory is renamed to .<name>.new-<id>, the current one to .<name>.old-<id>, then
    .new-<id> to <name>. A kill at any point leaves <name> or a complete .new-<id>/.old-<id> beside it, and
    `recover_dir` (which readers and the next writer call) puts the newest complete one back at <name>. The
    marker file inside (MARKER, naming <name> and <id>) is what proves these names ours; it is removed from
    <name> when the swap is done.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    remove_stale_temps(path.parent, path.name)
    _remove_swap_leftovers(path)
    suffix = _new_suffix()
    tmp, new, old = (_own_name(path, kind, suffix) for kind in ("tmp", "new", "old"))
    os.mkdir(tmp, 0o777)  # fails if the name exists; the mode is 0o777 less the umask, like any directory
    try:
        _write_marker(tmp, path.name, suffix)
        with storage_errors(path):
            yield tmp
            _write_marker(tmp, path.name, suffix)  # again: what the block copied in may have replaced it
            for f in tmp.rglob("*"):
                if f.is_file():
                    # safetensors (and so PEFT) writes through a private temporary file: make the result
                    # readable like any file the user's umask allows, as config.json and tokenizer.json are
                    os.chmod(f, 0o666 & ~_umask())
                    _fsync(f)
            _fsync(tmp)
        os.replace(tmp, new)
        if os.path.lexists(path):
            os.replace(path, old)
        os.replace(new, path)
        _fsync(path.parent)
        if os.path.lexists(old):
            shutil.rmtree(old, ignore_errors=True)
        (path / MARKER).unlink(missing_ok=True)
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def copy_atomically(src: Path, dst: Path) -> None:
    """Copy a file or a directory to `dst`, replacing it the atomic way (see atomic_file / atomic_dir)."""
    if src.is_dir():
        with atomic_dir(dst) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
    else:
        with atomic_file(dst) as f, open(src, "rb") as source:
            shutil.copyfileobj(source, f)


def state_dict_for_saving(model: GPT) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in tied_keys(model)}


def save_model_dir(
    model: GPT, tokenizer: Tokenizer, path: str | Path, extra: Optional[dict] = None, files: Optional[dict] = None
) -> Path:
    """Export `model` + `tokenizer` to a model directory (atomically). `extra` goes into config.json; `files`
    ({name: JSON object}, e.g. tokenizer_config.json with a chat template) are written beside."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        for name, content in (files or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2))
        save_file(state_dict_for_saving(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        config = model.config.to_dict()
        if extra:
            config["gpt"] = extra
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        tokenizer.save(tmp / TOKENIZER_FILE)
    return path


def weights_sha256(path: str | Path) -> str:
    """Fingerprint of a model directory's weights (what an adapter records as its base)."""
    h = hashlib.sha256()
    with open(Path(path) / WEIGHTS_FILE, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_tensors(
    expected: dict[str, tuple], state: dict[str, torch.Tensor], source: str, fix: str = "re-export the model"
) -> None:
    """Every expected tensor present, none extra, every shape right; the error names the first bad key."""
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing:
        raise GPTError(
            f"{source} is missing tensor {missing[0]!r}"
            + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
            + f": the file does not match its config.json; {fix}"
        )
    if extra:
        raise GPTError(
            f"{source} has unexpected tensor {extra[0]!r}"
            + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else "")
            + ": it was saved from a different architecture"
        )
    for k, shape in expected.items():
        got = tuple(getattr(state[k], "shape", state[k]))  # a tensor, or the shape alone (read from a header)
        if got != tuple(shape):
            raise GPTError(
                f"{source}: tensor {k!r} has shape {got} but the config needs {tuple(shape)} "
                "(a checkpoint from a different vocabulary or model size?)"
            )


def check_config_matches(config: GPTConfig, shapes: dict[str, tuple], source: str) -> None:
    """The config against the weights' shapes, before a model is built from it: a config.json edited to an
    absurd size (vocab_size=10**12) is refused here instead of allocating terabytes. The layer count and the
    embeddings first (cheap, and they bound what the meta-device model below would build)."""
    layers = {k.split(".")[2] for k in shapes if k.startswith("transformer.h.")}
    if config.n_layer > len(layers):  # (more layers in the file than the config's: check_tensors names one)
        raise GPTError(
            f"{source} holds {len(layers)} layers but its config says n_layer={config.n_layer}; the config "
            "was edited or belongs to another model: re-export the model"
        )
    for key, dims in (
        ("transformer.wte.weight", ("vocab_size", "n_embd")),
        ("transformer.wpe.weight", ("block_size", "n_embd")),
    ):
        want = tuple(getattr(config, d) for d in dims)
        if key in shapes and tuple(shapes[key]) != want:
            raise GPTError(
                f"{source}: tensor {key!r} has shape {tuple(shapes[key])} but the config says "
                f"{', '.join(f'{d}={getattr(config, d)}' for d in dims)} (weights of a different vocabulary "
                "or model size, or an edited config): re-export the model"
            )
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = GPT(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied_keys(model)}
    check_tensors(expected, {k: v for k, v in shapes.items() if k not in tied_keys(model)}, source)


def safetensors_shapes(path: Path, fix: str) -> dict[str, tuple]:
    """The tensors' shapes from a safetensors header, without reading the data."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise GPTError(f"{path} is truncated or corrupt ({e}); {fix}") from e


def load_weights(model: GPT, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load: every tensor present, none extra, every shape right; errors name the key."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied_keys(model)}
    state = {k: v for k, v in state.items() if k not in tied_keys(model)}
    check_tensors(expected, state, source)
    model.load_state_dict(state, strict=False)  # strict=False only for a tied lm_head, checked above


def read_safetensors(path: str | Path, fix: str, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise GPTError(f"{path} is truncated or corrupt ({e}); {fix}") from e


def load_model_dir(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    path = recover_dir(path)
    if not path.is_dir() or not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise GPTError(
            f"{path} is not a model directory (needs {CONFIG_FILE} and {WEIGHTS_FILE}); point at an exported "
            "model such as runs/<name>/latest/checkpoints/best, or at a Lightning .ckpt file"
        )
    raw = read_json(path / CONFIG_FILE, "re-export the model")  # an object, of sane depth
    if raw.get("model_type", "gpt") != "gpt" or "architectures" in raw:  # transformers' config.json
        raise GPTError(
            f"{path} is a Hugging Face model directory (model_type {raw.get('model_type')!r}); convert it "
            f"first: python -m gpt.convert import-hf {path} <new dir>, then use the new directory"
        )
    check_model_record(raw.get("gpt"), str(path / CONFIG_FILE))  # what the run recorded: task, decoding, step
    config = GPTConfig.from_dict({k: v for k, v in raw.items() if k != "gpt"}, str(path / CONFIG_FILE))
    check_config_matches(
        config, safetensors_shapes(path / WEIGHTS_FILE, "re-export it from a .ckpt"), str(path / WEIGHTS_FILE)
    )
    state = read_safetensors(path / WEIGHTS_FILE, "re-export it from a .ckpt", map_location)
    tokenizer = Tokenizer.load(path)
    if tokenizer.vocab_size > config.vocab_size:
        raise GPTError(
            f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}; "
            "the tokenizer.json belongs to a different model"
        )
    model = GPT(config)
    load_weights(model, state, str(path / WEIGHTS_FILE))
    return model.to(map_location), tokenizer


def why_unloadable(e: Exception) -> str:
    """torch.load's reason for refusing a file, short, without its advice to retry with weights_only=False
    (which would run whatever code the file carries)."""
    reasons = []
    for paragraph in re.split(r"\n\s*\n", str(e)):
        paragraph = re.sub(r"^.*WeightsUnpickler error:", "", paragraph, flags=re.S)  # after "please file an issue"
        paragraph = re.sub(r"Please use `torch\.serialization\.\S+.*", "", paragraph, flags=re.S)  # allow-listing
        if paragraph.strip() and not paragraph.lstrip().startswith(
            ("Weights only load failed", "Check the documentation")
        ):
            reasons.append(" ".join(paragraph.split()))
    return f"{type(e).__name__}: {(reasons or ['a pickle that weights_only=True refuses'])[0][:150]}"


def torch_load(path: str | Path, **kwargs) -> object:
    """torch.load(weights_only=True), without the weights-only unpickler's warning about pickle protocols."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(str(path), map_location="cpu", weights_only=True, **kwargs)


def torch_load_safely(path: str | Path, advice: str) -> object:
    """torch.load with weights_only=True; a pickle that tries to run code is refused, never executed."""
    try:
        return torch_load(path)
    except Exception as e:  # UnpicklingError for forbidden globals, RuntimeError/EOFError for truncated files
        raise GPTError(
            f"{path} cannot be loaded safely ({why_unloadable(e)}); it is corrupt, truncated or contains code; {advice}"
        ) from e


def read_lightning_ckpt(path: str | Path) -> dict:
    """A Lightning .ckpt (or any torch.save file), read without running code."""
    return torch_load_safely(path, "only load checkpoints written by this tool")


def holds_lora(names) -> bool:
    """Whether these parameter / state-dict names include PEFT's LoRA factors (a fine-tuning checkpoint)."""
    return any("lora_A" in name for name in names)


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """A model and its tokenizer from an exported directory or a Lightning `.ckpt` written by train.py."""
    path = recover_dir(path)
    if not path.exists():
        raise GPTError(f"{path} does not exist; point at an exported model directory or a .ckpt file")
    if path.is_file() and path.name in (CONFIG_FILE, WEIGHTS_FILE, "tokenizer.json"):
        raise GPTError(f"{path} is one file of a model directory; point at the directory itself: {path.parent}")
    if path.is_dir():
        if (path / ADAPTER_CONFIG_FILE).is_file():  # finetune.py's output, not a whole model
            raise GPTError(
                f"{path} holds a LoRA adapter, not a whole model; sample with adapter={path} (its base "
                "model is found from the adapter's record), or fine-tune with merge=true for a whole model"
            )
        return load_model_dir(path, map_location)
    ckpt = read_lightning_ckpt(path)
    meta = ckpt.get("gpt") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise GPTError(f"{path} is not a checkpoint written by train.py (no model config inside)")
    lacking = [k for k, kind in (("config", dict), ("tokenizer", str)) if not isinstance(meta.get(k), kind)]
    if lacking or not all(isinstance(v, torch.Tensor) for v in ckpt["state_dict"].values()):
        raise GPTError(
            f"{path} is an incomplete checkpoint record (its {(lacking or ['state_dict'])[0]!r} entry is "
            "missing or of the wrong type); resume or export from another .ckpt of the run, e.g. best.ckpt"
        )
    if holds_lora(ckpt["state_dict"]):
        raise GPTError(
            f"{path} is a LoRA fine-tuning checkpoint, not a whole model; use the adapter directory beside "
            f"it (sample.py adapter={path.with_suffix('')}), or fine-tune with merge=true for a whole model"
        )
    config = GPTConfig.from_dict(meta["config"], f"{path}'s model config")
    state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    check_config_matches(config, {k: tuple(v.shape) for k, v in state.items()}, str(path))
    tokenizer = Tokenizer.from_str(meta["tokenizer"], f"{path}'s tokenizer entry")
    model = GPT(config)
    load_weights(model, state, str(path))
    return model.to(map_location), tokenizer
