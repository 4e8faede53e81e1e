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

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from gpt.atomic import atomic_dir, recover_dir
from gpt.config import GPTConfig
from gpt.errors import GPTError, read_json
from gpt.jsonfiles import check_model_record
from gpt.memory import check_fits_in_memory
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
    check_fits_in_memory(config)
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
    check_fits_in_memory(config)
    model = GPT(config)
    load_weights(model, state, str(path))
    return model.to(map_location), tokenizer
