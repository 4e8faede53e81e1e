"""LoRA adapters through PEFT: which layers get one, adapter directories on disk, merging.

An adapter directory holds PEFT's own files, so `peft.PeftModel.from_pretrained(gpt, dir)` loads it,
plus what it takes to use it without guessing:

    adapter_config.json         PEFT's LoraConfig (rank, alpha, dropout, target modules)
    adapter_model.safetensors   the LoRA weights only
    tokenizer.json              the base model's tokenizer
    gpt_adapter.json            the base it belongs to (path + sha256 of its model.safetensors) and the
                                task's prompt template, so sample.py prompts it the way it was trained

An adapter only makes sense on the exact weights it was trained on: loading it onto another base is
refused, naming both fingerprints.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors import SafetensorError, safe_open

from gpt.checkpoint import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    RECORD_FILE,
    WEIGHTS_FILE,
    atomic_dir,
    load_model_dir,
    weights_sha256,
)
from gpt.errors import BadJSON, GPTError, is_finite, is_int, is_number, parse_json, read_json
from gpt.jsonfiles import check_adapter_record
from gpt.model import GPT
from gpt.tokenizer import TOKENIZER_FILE, Tokenizer

log = logging.getLogger(__name__)

PEFT_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)

# Friendly target names -> our module names (GPT-2's). PEFT matches a name against the end of a module's
# dotted path, so "attn.c_proj" hits transformer.h.<i>.attn.c_proj in every block (and not mlp.c_proj).
TARGETS = {
    "qkv": ("attn.c_attn",),  # the fused query/key/value projection
    "attn_out": ("attn.c_proj",),  # attention output projection
    "mlp": ("mlp.c_fc", "mlp.c_proj"),
    "lm_head": ("lm_head",),  # the output projection (tied to the token embedding; see merge)
}


def target_modules(targets: Sequence[str]) -> list[str]:
    """Friendly names (qkv, attn_out, mlp, lm_head) or module names (mlp.c_fc) -> module names."""
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise GPTError(f"lora.targets is empty; choose from {list(TARGETS)} (or module names such as mlp.c_fc)")
    modules: list[str] = []
    for t in targets:
        for m in TARGETS.get(t, (t,)):
            if m not in modules:
                modules.append(m)
    return modules


def lora_config(
    rank: int = 16, alpha: float = 32, dropout: float = 0.05, targets: Sequence[str] = ("qkv", "attn_out", "mlp")
) -> LoraConfig:
    """PEFT's LoraConfig from our settings (configs/lora/*.yaml)."""
    if not is_int(rank) or rank <= 0:
        raise GPTError(f"lora.rank must be a positive integer (got {rank!r})")
    if not is_finite(alpha) or alpha <= 0:
        raise GPTError(f"lora.alpha must be a finite number > 0 (got {alpha!r})")
    if not (is_number(dropout) and 0.0 <= dropout < 1.0):  # NaN fails both comparisons
        raise GPTError(f"lora.dropout must be a number in [0, 1) (got {dropout!r})")
    if (
        isinstance(targets, (str, bytes))
        or not hasattr(targets, "__iter__")
        or not all(isinstance(t, str) for t in targets)
    ):
        raise GPTError(f"lora.targets must be a list of names, e.g. lora.targets=[qkv,mlp] (got {targets!r})")
    return LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules(list(targets)), bias="none"
    )


def add_lora(model: GPT, config: LoraConfig) -> PeftModel:
    """Wrap `model` with fresh LoRA adapters (in place: its Linear layers become LoRA layers); only the
    adapters are trainable."""
    linear = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for target in config.target_modules:
        if not any(name == target or name.endswith("." + target) for name in linear):
            raise GPTError(
                f"LoRA target {target!r} matches no linear layer of the model; use {list(TARGETS)} "
                f"or module names such as {', '.join(sorted({n.split('.', 3)[-1] for n in linear})[:6])}"
            )
    full = sorted(
        {
            name.split(".", 3)[-1]
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)
            and any(name == t or name.endswith("." + t) for t in config.target_modules)
            and config.r >= min(m.in_features, m.out_features)
        }
    )
    if full:  # allowed (it trains), but nothing low-rank is left: as many weights as full fine-tuning or more
        log.warning(
            "lora.rank=%d is not below the width of %s: the adapter can hold any update there and has "
            "as many weights as the layer or more; a rank well below the width is what LoRA is for",
            config.r,
            ", ".join(full),
        )
    return get_peft_model(model, config)


def count_parameters(model: PeftModel) -> tuple[int, int]:
    """(trainable, total) parameters; tied weights counted once."""
    return model.get_nb_trainable_parameters()


# ----------------------------------------------------------------------------------------------------
# On disk


def base_record(base_dir: str | Path) -> dict:
    base_dir = Path(base_dir)
    return {"path": str(base_dir.resolve()), "sha256": weights_sha256(base_dir)}


def save_adapter_dir(
    model: PeftModel, tokenizer: Tokenizer, path: str | Path, record: dict, files: Optional[dict] = None
) -> Path:
    """PEFT's files + tokenizer.json + gpt_adapter.json, written atomically. `record` has at least
    {"base": base_record(...)}; the task's template and training step go there too. `files`: as save_model_dir."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        for name, content in (files or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2))
        model.peft_config["default"].base_model_name_or_path = record["base"]["path"]
        model.save_pretrained(str(tmp), save_embedding_layers=False)  # we never resize the vocabulary
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
        tokenizer.save(tmp / TOKENIZER_FILE)
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2))
    return path


def read_adapter_record(adapter_dir: str | Path) -> dict:
    adapter_dir = Path(adapter_dir)
    missing = [f for f in (*PEFT_FILES, RECORD_FILE) if not (adapter_dir / f).is_file()]
    if not adapter_dir.is_dir() or missing:
        raise GPTError(
            f"{adapter_dir} is not an adapter directory (missing {', '.join(missing) or 'the folder'}); "
            "point at a fine-tuning run's checkpoints/best"
        )
    record = read_json(adapter_dir / RECORD_FILE, "re-export the adapter (re-run finetune.py)", top=None)
    return check_adapter_record(record, str(adapter_dir / RECORD_FILE))  # keys, and the type of each


def _off(value, default=None) -> bool:
    """A PEFT setting at its 'not used' value: the default's own null, false, {} or [] (PEFT reads a null
    where it wants a {} as a dict)."""
    if default is None or default is False:
        return value is default
    return isinstance(default, (dict, list)) and not default and type(value) is type(default) and not value


def check_peft_config(adapter_dir: Path) -> None:
    """adapter_config.json in the shape finetune.py writes (PEFT's LoraConfig), checked before PEFT reads it:
    a field of the wrong type would be an AttributeError deep inside PEFT, and a LoRA feature finetune.py never
    turns on (megatron_config imports the module megatron_core names, DoRA, layer replication, ...) is
    refused rather than acted on."""
    path = adapter_dir / ADAPTER_CONFIG_FILE
    fix = "re-run finetune.py to write it again"
    try:
        config = parse_json(path.read_bytes())
    except (BadJSON, OSError) as e:
        kind = getattr(e, "kind", type(e).__name__)
        raise GPTError(
            f"{adapter_dir} holds a truncated or corrupt adapter ({kind}: {path.name}: {e}); {fix}"
        ) from None
    checks = {
        "peft_type": (lambda v: v == "LORA", "'LORA'"),
        "r": (lambda v: is_int(v) and v > 0, "a positive whole number"),
        "lora_alpha": (lambda v: is_finite(v) and v > 0, "a finite number > 0"),
        "lora_dropout": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
        "target_modules": (
            lambda v: isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(t, str) for t in v)),
            "a list of module names",
        ),
        "bias": (lambda v: v == "none", "'none'"),
        "init_lora_weights": (lambda v: isinstance(v, (bool, str)), "true, false or a method's name"),
        "inference_mode": (lambda v: isinstance(v, bool), "true or false"),
        "base_model_name_or_path": (lambda v: isinstance(v, (str, type(None))), "a path or null"),
        "revision": (lambda v: isinstance(v, (str, type(None))), "text or null"),
    }
    off = {k: v for k, v in LoraConfig().to_dict().items() if _off(v, v) and k not in checks and k != "auto_mapping"}
    for key in ("peft_type", "r", "target_modules"):
        if key not in config:
            raise GPTError(f"{path} lacks {key!r}; it is not a LoRA adapter's config: {fix}")
    for key, value in config.items():
        if key in checks and not checks[key][0](value):
            raise GPTError(f"{path}: {key} must be {checks[key][1]} (got {value!r:.60}); {fix}")
        if key in off and not _off(value, off[key]):
            raise GPTError(
                f"{path}: {key}={value!r:.60} is not the value finetune.py writes ({json.dumps(off[key])}: a "
                f"PEFT feature it never uses); {fix}"
            )


def check_base(adapter_dir: str | Path, base_dir: str | Path, record: dict, base_option: str = "ckpt") -> None:
    """Refuse a base whose weights are not the ones the adapter was trained on."""
    want = record["base"]
    if not (Path(base_dir) / WEIGHTS_FILE).is_file():
        raise GPTError(
            f"the base for adapter {adapter_dir} must be an exported model directory (with {WEIGHTS_FILE}); "
            f"{base_dir} is not one; the adapter was trained on {want['path']}"
        )
    got = weights_sha256(base_dir)
    if got != want["sha256"]:
        raise GPTError(
            f"adapter {adapter_dir} belongs to a different base: it was trained on {want['path']} "
            f"(weights sha256 {want['sha256'][:12]}…) but {base_dir} has sha256 {got[:12]}…; "
            f"load it onto its own base ({base_option}={want['path']})"
        )


def load_adapter(
    adapter_dir: str | Path,
    base: Optional[str | Path] = None,
    map_location: str | torch.device = "cpu",
    base_option: str = "ckpt",
) -> tuple[PeftModel, Tokenizer, dict]:
    """The base model (the recorded one unless `base` is given) with the adapter on it, for inference.
    `base_option` is the command-line name of `base` in error messages. Returns (model, tokenizer, record)."""
    adapter_dir = Path(adapter_dir)
    record = read_adapter_record(adapter_dir)
    base_dir = Path(base) if base else Path(record["base"]["path"])
    if not base_dir.exists():
        raise GPTError(
            f"the base model of adapter {adapter_dir} is not at {base_dir}; pass its location with "
            f"{base_option}=<exported model dir> (its weights are checked against the recorded sha256)"
        )
    check_base(adapter_dir, base_dir, record, base_option)
    check_peft_config(adapter_dir)
    model, tokenizer = load_model_dir(base_dir, map_location)
    try:
        with warnings.catch_warnings():  # checked below, as an error
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
            peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError, IndexError) as e:
        # PEFT's own errors for a truncated weights file, a broken adapter_config.json, or factors whose
        # shapes are not the config's rank / the base's layers
        raise GPTError(
            f"{adapter_dir} holds a truncated or corrupt adapter ({type(e).__name__}: "
            f"{(str(e).splitlines() or [''])[0][:200]}); re-run finetune.py to write it again"
        ) from e
    # PEFT only warns when the file lacks some factors: those layers would run without their adapter
    with safe_open(str(adapter_dir / PEFT_FILES[1]), "pt") as f:
        missing = sorted(set(get_peft_model_state_dict(peft_model, save_embedding_layers=False)) - set(f.keys()))
    if missing:
        raise GPTError(
            f"{adapter_dir / PEFT_FILES[1]} lacks {len(missing)} LoRA tensors its adapter_config.json asks "
            f"for (e.g. {missing[0]}); it was edited or belongs to another config: re-run finetune.py"
        )
    return peft_model.eval(), tokenizer, record


def merge(model: PeftModel) -> GPT:
    """Fold the adapter into the base weights (in place) and return the plain GPT.

    The LM head shares its matrix with the token embedding. Merging a LoRA update into it would change the
    input embedding too, so an adapter on lm_head first unties the two (the merged model then carries its
    own output matrix, `tie_embeddings: false`).
    """
    base: GPT = model.get_base_model()
    head = base.lm_head
    if hasattr(head, "base_layer") and base.config.tie_embeddings:
        layer = head.get_base_layer()
        layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        base.config = replace(base.config, tie_embeddings=False)
    return model.merge_and_unload()
