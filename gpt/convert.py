"""Convert between our model directories and Hugging Face GPT-2 and Llama directories.

    python -m gpt.convert import-hf <hf_dir> <out_dir>          a local GPT-2 or Llama download -> one of our model dirs
    python -m gpt.convert export-hf <model_dir|.ckpt> <hf_dir>  one of ours -> a dir transformers loads (GPT-2 or Llama)

GPT-2: our parameter names are GPT-2's, so the mapping is short: Hugging Face stores the four projections of
a block (`attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`) as `Conv1D`, whose weight is the transpose
of an `nn.Linear` weight; everything else is copied as is.
Llama (`LlamaForCausalLM`, e.g. SmolLM2): our fused projections are Llama's separate ones stacked (c_attn =
q_proj, k_proj, v_proj; a SwiGLU c_fc = gate_proj, up_proj), the rest is renamed. Our RoPE rotates halves as
transformers' Llama does, so q/k weights are copied as they are (no permutation).
Which of the two a model exports as follows from its config: GPT-2's block or Llama's (RoPE + RMSNorm + SwiGLU).
Loading is strict: a config we cannot represent, a missing, extra or wrongly shaped tensor is refused with a
message that names it, never loaded in part.
Nothing is read with pickle except `pytorch_model.bin`, and that only through `torch.load(weights_only=True)`.

transformers is used here (to read and write its own formats) and in the tests, never by `gpt/model.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from gpt.atomic import MARKER, atomic_dir
from gpt.checkpoint import (
    ADAPTER_CONFIG_FILE,
    CONFIG_FILE,
    WEIGHTS_FILE,
    check_tensors,
    load_model,
    load_weights,
    read_safetensors,
    save_model_dir,
    tied_keys,
    torch_load_safely,
)
from gpt.cli import fail, user_errors
from gpt.config import GPTConfig
from gpt.errors import GPTError
from gpt.ggufexport import add_arguments as add_gguf_arguments
from gpt.ggufexport import describe as describe_gguf
from gpt.ggufexport import export_gguf
from gpt.hftokenizer import read_json, save_hf_tokenizer, tokenizer_from_hf
from gpt.llama import (
    LLAMA_BLOCK,
    check_float_weights,
    check_import_fits,
    check_not_quantized,
    config_from_llama,
    llama_config,
    llama_state_dict,
    state_from_llama,
)
from gpt.model import GPT
from gpt.tokenizer import TOKENIZER_FILE, Tokenizer

ACTIVATION_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
ACTIVATION_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
CONV1D = ("c_attn", "c_proj", "c_fc")  # modules whose weights Hugging Face stores transposed
# The causal-mask buffers older transformers versions saved with every layer: constants, not weights
# (transformers itself ignores them when loading).
MASK_BUFFER = re.compile(r"^(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$")
# Config fields our GPT has no equivalent for, and the one value of each it does compute.
REQUIRED = {"add_cross_attention": False, "scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True}
ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")  # a language model, no extra heads
# The block each Hugging Face class computes, in our config's terms
GPT2_BLOCK = dict(pos_emb="learned", norm="layernorm", mlp="gelu")
# In the order looked for: safetensors first, a single file before a sharded one.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# What --force may replace: a directory import-hf or export-hf wrote, which carries OWN_MARKER listing its files,
# or one of our model directories written before the marker existed (exactly these files, our config.json).
OWN_MARKER = ".gpt-model"
LEGACY_FILES = {CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE}


# ----------------------------------------------------------------------------------------------------
# Weights: our layout <-> GPT-2's


def _is_conv1d(name: str) -> bool:
    parts = name.split(".")
    return parts[-1] == "weight" and parts[-2] in CONV1D


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under GPT-2's names and layout (as `GPT2LMHeadModel.save_pretrained` writes them).

    A tied lm_head is left out, as transformers does. A model built with bias=False gets zero biases:
    GPT-2 always has them, and adding zero changes nothing.
    """
    out = {
        k: (v.t().contiguous() if _is_conv1d(k) else v)
        for k, v in model.state_dict().items()
        if k not in tied_keys(model)
    }
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and name != "lm_head" and module.bias is None:
            w = module.weight
            out[f"{name}.bias"] = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    return out


def state_from_hf(state: dict[str, torch.Tensor], config: GPTConfig, source: str) -> dict[str, torch.Tensor]:
    """A GPT-2 state dict (as saved by GPT2LMHeadModel or GPT2Model) in our names and layout, checked strictly."""
    state = {k: v for k, v in state.items() if not MASK_BUFFER.match(k)}
    lm_head = state.pop("lm_head.weight", None)
    # GPT2LMHeadModel saves "transformer.h.0...", GPT2Model (the released checkpoints) "h.0...": check the
    # file in its own naming so that errors name its keys.
    prefix = "transformer." if any(k.startswith("transformer.") for k in state) else ""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        reference = hf_state_dict(GPT(config))
    reference.pop("lm_head.weight", None)
    expected = {prefix + k.removeprefix("transformer."): tuple(v.shape) for k, v in reference.items()}
    check_tensors(expected, state, source, fix="download the checkpoint again (all of its files)")
    out = {"transformer." + k.removeprefix(prefix): (v.t() if _is_conv1d(k) else v) for k, v in state.items()}
    if config.tie_embeddings:
        if lm_head is not None and not torch.equal(lm_head, state[prefix + "wte.weight"]):
            raise GPTError(
                f"{source}: 'lm_head.weight' differs from the token embedding '{prefix}wte.weight' but "
                "config.json says tie_word_embeddings=true; set it to false (an untied output layer)"
            )
    else:  # an untied output layer (e.g. a merged LoRA adapter on lm_head): its own tensor
        if lm_head is None:
            raise GPTError(
                f"{source} is missing tensor 'lm_head.weight' (config.json says tie_word_embeddings=false); "
                "download the checkpoint again (all of its files)"
            )
        check_tensors(
            {"lm_head.weight": tuple(out["transformer.wte.weight"].shape)}, {"lm_head.weight": lm_head}, source
        )
        out["lm_head.weight"] = lm_head
    return out


# ----------------------------------------------------------------------------------------------------
# Configs


def config_from_hf(raw: dict, source: str) -> GPTConfig:
    """Our GPTConfig for a Hugging Face config.json (GPT-2 or Llama); anything we cannot compute is refused by name."""
    model_type, archs = raw.get("model_type"), raw.get("architectures") or []
    check_not_quantized(raw, source)
    if model_type == "llama":
        return config_from_llama(raw, source)
    if model_type != "gpt2":
        found = f"model_type {model_type!r}" + (f", architectures {archs}" if archs else "")
        hint = (
            "it is already one of our model directories: use it as it is"
            if model_type == "gpt"
            else "import-hf converts Hugging Face GPT-2 and Llama checkpoints (model_type 'gpt2' or 'llama') only"
        )
        raise GPTError(f"{source} describes {found}, not GPT-2 or Llama; {hint}")
    extra_heads = [a for a in archs if a not in ARCHITECTURES]
    if extra_heads:
        raise GPTError(
            f"{source}: architectures {extra_heads} are not supported; import-hf takes a GPT-2 language "
            f"model ({' or '.join(ARCHITECTURES)}), without extra heads"
        )
    try:
        hf = GPT2Config.from_dict(raw)  # the defaults transformers itself fills in for fields a file leaves out
    except Exception as e:  # transformers validates types with its own exception classes
        raise GPTError(
            f"{source} is not a valid GPT-2 config ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from e
    for field, value in REQUIRED.items():
        if getattr(hf, field) != value:
            raise GPTError(
                f"{source}: {field}={getattr(hf, field)!r} is not supported (our GPT computes "
                f"{field}={value}); this checkpoint cannot be represented"
            )
    if hf.n_inner not in (None, 4 * hf.n_embd):
        raise GPTError(
            f"{source}: n_inner={hf.n_inner} is not supported (our MLP is 4 * n_embd = {4 * hf.n_embd} wide)"
        )
    if hf.activation_function not in ACTIVATION_FROM_HF:
        raise GPTError(
            f"{source}: activation_function {hf.activation_function!r} is not supported; "
            f"supported: {', '.join(ACTIVATION_FROM_HF)}"
        )
    return GPTConfig(
        block_size=hf.n_positions,
        vocab_size=hf.vocab_size,
        n_layer=hf.n_layer,
        n_head=hf.n_head,
        n_embd=hf.n_embd,
        bias=True,
        norm_eps=hf.layer_norm_epsilon,
        activation=ACTIVATION_FROM_HF[hf.activation_function],
        # One dropout rate for the three places GPT-2 names separately (all 0.1 in the releases).
        dropout=float(max(hf.resid_pdrop, hf.embd_pdrop, hf.attn_pdrop)),
        tie_embeddings=bool(hf.tie_word_embeddings),
    )


def hf_config(config: GPTConfig, tokenizer: Tokenizer) -> GPT2Config:
    """The GPT2Config of one of our models (its vocab_size, padding included, is the model's)."""
    eos = tokenizer.eos_id
    return GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=None,
        activation_function=ACTIVATION_TO_HF[config.activation],
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        layer_norm_epsilon=config.norm_eps,
        bos_token_id=eos,
        eos_token_id=eos,
        tie_word_embeddings=config.tie_embeddings,
    )


def hf_format(config: GPTConfig) -> str:
    """ "gpt2" or "llama": the Hugging Face class that computes what this config does; anything else is refused."""
    choices = {k: getattr(config, k) for k in GPT2_BLOCK}
    if choices == GPT2_BLOCK and config.kv_heads == config.n_head and config.hidden_dim == 4 * config.n_embd:
        return "gpt2"
    if choices == LLAMA_BLOCK:
        return "llama"
    mine = ", ".join(f"{k}={v}" for k, v in choices.items())
    raise GPTError(
        f"this model ({mine}, n_kv_head={config.kv_heads}, MLP width {config.hidden_dim}) is neither "
        "GPT-2's block (learned, layernorm, gelu, n_kv_head = n_head, width 4 * n_embd) nor Llama's (rope, "
        "rmsnorm, swiglu): no transformers class computes it, so export-hf cannot write it"
    )


# ----------------------------------------------------------------------------------------------------
# The two verbs


def check_hf_dir(hf_dir: Path) -> Path:
    if not hf_dir.is_dir() or not (hf_dir / CONFIG_FILE).is_file():
        raise GPTError(
            f"{hf_dir} is not a Hugging Face model directory (needs {CONFIG_FILE}); point at a local "
            "GPT-2 or Llama download, e.g. `hf download openai-community/gpt2 --local-dir gpt2`"
        )
    return hf_dir


def read_hf_dir(hf_dir: str | Path) -> tuple[GPT, Tokenizer, dict]:
    """Our model and tokenizer for a local Hugging Face GPT-2 or Llama directory, and where they came from."""
    hf_dir = check_hf_dir(Path(hf_dir))
    raw = read_json(hf_dir / CONFIG_FILE)
    config = config_from_hf(raw, str(hf_dir / CONFIG_FILE))
    check_import_fits(config, raw, str(hf_dir / CONFIG_FILE))
    tokenizer = tokenizer_from_hf(hf_dir, raw, config.vocab_size)
    state, source = read_hf_weights(hf_dir)
    check_float_weights({k: v for k, v in state.items() if not MASK_BUFFER.match(k)}, source)
    model = GPT(config)
    from_hf = state_from_llama if raw["model_type"] == "llama" else state_from_hf
    load_weights(model, from_hf(state, config, source), source)
    return (
        model,
        tokenizer,
        {"format": f"huggingface-{raw['model_type']}", "path": str(hf_dir.resolve()), "weights": Path(source).name},
    )


def import_hf(hf_dir: str | Path, out_dir: str | Path, force: bool = False) -> tuple[Path, GPT]:
    """A local Hugging Face GPT-2 or Llama directory -> one of our exported model directories."""
    hf_dir, out_dir = check_hf_dir(Path(hf_dir)), Path(out_dir)
    out_dir = check_output_dir(out_dir, hf_dir, force)
    model, tokenizer, origin = read_hf_dir(hf_dir)
    make_parent(out_dir)
    record = own_record([CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE])  # the files save_model_dir writes
    save_model_dir(model, tokenizer, out_dir, extra={"converted_from": origin}, files={OWN_MARKER: record})
    return out_dir, model


def export_hf(model_path: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    """One of our models (exported dir or .ckpt) -> a directory transformers loads as GPT-2 or as Llama."""
    model_path, out_dir = Path(model_path), Path(out_dir)
    if (model_path / ADAPTER_CONFIG_FILE).is_file():
        raise GPTError(
            f"{model_path} holds a LoRA adapter ({ADAPTER_CONFIG_FILE}), not a whole model; merge it into its "
            "base model first and export the merged model directory"
        )
    out_dir = check_output_dir(out_dir, model_path, force)
    model, tokenizer = load_model(model_path)
    if hf_format(model.config) == "llama":
        state, embedding = llama_state_dict(model), "model.embed_tokens.weight"
        make = lambda: LlamaForCausalLM(llama_config(model.config, tokenizer))  # noqa: E731
    else:
        state, embedding = hf_state_dict(model), "transformer.wte.weight"
        make = lambda: GPT2LMHeadModel(hf_config(model.config, tokenizer))  # noqa: E731
    if model.config.tie_embeddings:
        state["lm_head.weight"] = state[embedding]
    with torch.device("meta"):  # the weights are ours: no memory for transformers' random initialisation
        hf = make()
    hf.load_state_dict(state, strict=True, assign=True)  # strict: a key mismatch here is a bug in the mapping
    hf.tie_weights()
    make_parent(out_dir)
    with atomic_dir(out_dir) as tmp:
        hf.save_pretrained(str(tmp))
        save_hf_tokenizer(tokenizer, tmp, model.config.block_size)
        record = own_record([p.name for p in tmp.iterdir() if p.name != MARKER])
        (tmp / OWN_MARKER).write_text(json.dumps(record, indent=2))
    return out_dir


# ----------------------------------------------------------------------------------------------------
# Files


def read_hf_weights(hf_dir: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict of a Hugging Face model directory (single or sharded; safetensors preferred)."""
    path = next((hf_dir / name for name in WEIGHT_FILES if (hf_dir / name).is_file()), None)
    if path is None:
        raise GPTError(f"{hf_dir} has no weights: expected one of {', '.join(WEIGHT_FILES)}")
    if not path.name.endswith(".index.json"):
        return _read_weight_file(path), str(path)
    weight_map = read_json(path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise GPTError(f"{path} has no weight_map; download it again")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if not isinstance(shard, str) or Path(shard).name != shard or not (hf_dir / shard).is_file():
            raise GPTError(f"{path} names shard {shard!r}, which is not a file in {hf_dir}; download all the shards")
        state.update(_read_weight_file(hf_dir / shard))
    return state, str(path)


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return read_safetensors(path, "download it again")
    state = torch_load_safely(path, "use the model.safetensors file instead, or a source you trust")
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise GPTError(f"{path} does not hold a state dict (a flat mapping of names to tensors)")
    return state


def own_record(files: list[str]) -> dict:
    """OWN_MARKER's content: the files we wrote, the only ones a later --force may delete."""
    return {"written_by": "gpt.convert", "files": sorted(files)}


def _legacy_ours(out: Path, names: set[str]) -> bool:
    """Whether `out` is one of our model directories from before OWN_MARKER (import-hf's, train.py's
    checkpoints/best/): exactly LEGACY_FILES, and a config.json that only this tool writes (every GPTConfig
    field). An export-hf directory without the marker cannot be told from transformers' own save_pretrained:
    it is not replaced."""
    try:
        raw = json.loads((out / CONFIG_FILE).read_text()) if names == LEGACY_FILES else None
        if isinstance(raw, dict) and "architectures" not in raw:
            GPTConfig.from_dict({k: v for k, v in raw.items() if k != "gpt"})
            return True
    except Exception:  # whatever it is, it is not a config we wrote: nothing is replaced
        pass
    return False


def owned_files(out: Path) -> Optional[set[str]]:
    """The names in `out` that import-hf / export-hf wrote, by its OWN_MARKER (or, for a directory written
    before the marker, by _legacy_ours); None for a directory that is not one of ours."""
    names = {p.name for p in out.iterdir()}
    marker = out / OWN_MARKER
    if marker.is_symlink() or not marker.is_file():
        return names if _legacy_ours(out, names) else None
    try:
        record = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    files = record.get("files") if isinstance(record, dict) and record.get("written_by") == "gpt.convert" else None
    if not isinstance(files, list) or not all(isinstance(f, str) and f and "/" not in f for f in files):
        return None
    return set(files) | {OWN_MARKER, MARKER}  # (MARKER: a replacement of it that a kill interrupted)


def check_output_dir(out: Path, source: Path, force: bool) -> Path:
    """Nothing is replaced by mistake: not the input, not the working directory, not a link (nor what it points
    to), not a non-empty directory unless --force, and with --force only a directory import-hf or export-hf
    wrote (its OWN_MARKER lists the files), holding nothing but those files. Returns the output, resolved."""
    if not source.exists():
        raise GPTError(f"{source} does not exist; point at a model directory")
    if out.is_symlink():  # checked before resolving: a link is refused by its own name, its target never touched
        raise GPTError(
            f"{out} is a symbolic link (to {os.readlink(out)}); nothing is written through a link: give a new "
            "directory, or the real path of a directory this tool wrote"
        )
    out = out.resolve()  # "." and "sub/.." name real directories too
    if out.exists() and not out.is_dir():
        raise GPTError(f"{out} is a file; give a directory path for the output")
    if out == source.resolve() or out in source.resolve().parents:
        raise GPTError(f"writing to {out} would replace the input {source}; choose another output directory")
    if out == Path.cwd().resolve() or out in Path.cwd().resolve().parents:
        raise GPTError(f"{out} is the working directory or holds it; choose a new directory for the output")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if entries and not force:
        raise GPTError(f"{out} exists and is not empty; choose a new directory, or pass --force to replace it")
    if not entries:
        return out
    owned = owned_files(out)
    foreign = [p for p in entries if owned is None or p.name not in owned or p.is_symlink() or not p.is_file()]
    if foreign:
        shown = ", ".join(p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in foreign[:4])
        shown += ", ..." if len(foreign) > 4 else ""
        what = "not a model directory this tool wrote" if owned is None else "files this tool did not write"
        raise GPTError(
            f"{out} holds {shown}: {what}; --force only replaces a directory import-hf or export-hf wrote, "
            "so choose a new directory (or move those files out)"
        )
    return out


def make_parent(out: Path) -> None:
    """The output's parent directories, made only once the input has been read and checked."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GPTError(
            f"cannot create {out} ({e.strerror}: {e.filename}); choose a directory you can write to"
        ) from None


# ----------------------------------------------------------------------------------------------------
# Command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's usage + error block -> our one `error:` line, exit status 2
        fail(f"{message}; see `{self.prog} --help`")


def main(argv: Optional[list[str]] = None) -> None:
    parser = _Parser(
        prog="python -m gpt.convert",
        description="\n\n".join(__doc__.split("\n\n")[:2]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="{import-hf,export-hf,export-gguf}")
    imp = verbs.add_parser("import-hf", help="a local Hugging Face GPT-2 or Llama directory -> one of our model dirs")
    imp.add_argument("hf_dir", help="config.json + model.safetensors (or pytorch_model.bin) + tokenizer files")
    imp.add_argument("out_dir", help="the model directory to write (sample.py ckpt=..., finetune.py base=...)")
    exp = verbs.add_parser("export-hf", help="one of our models -> a Hugging Face GPT-2 or Llama directory")
    exp.add_argument("model", help="an exported model directory (e.g. runs/<name>/latest/checkpoints/best) or a .ckpt")
    exp.add_argument("hf_dir", help="the directory to write (AutoModelForCausalLM / AutoTokenizer.from_pretrained)")
    for p in (imp, exp):
        p.add_argument("--force", action="store_true", help="replace the output directory if it is not empty")
    add_gguf_arguments(verbs.add_parser("export-gguf", help="one of our models -> a GGUF file llama.cpp runs"))
    args = parser.parse_args(argv)
    for name in ("hf_dir", "out_dir", "model", "out"):  # Path("") is the working directory: never what "" meant
        if getattr(args, name, None) == "":
            parser.error(f"the {name} argument is empty (it would name the working directory); give a path")

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with user_errors():
        if args.verb == "import-hf":
            out, model = import_hf(args.hf_dir, args.out_dir, force=args.force)
            c = model.config
            print(
                f"imported {args.hf_dir} -> {out}: {c.n_layer} layers, {c.n_head} heads, {c.n_embd} dims, "
                f"context {c.block_size}, vocab {c.vocab_size}, {model.num_params(non_embedding=False) / 1e6:.1f}M "
                f"parameters\nsample from it: python sample.py ckpt={out}"
            )
        elif args.verb == "export-gguf":
            print(describe_gguf(export_gguf(args.model, args.out, qtype=args.qtype, force=args.force)))
        else:
            out = export_hf(args.model, args.hf_dir, force=args.force)
            kind = "Llama" if json.loads((out / CONFIG_FILE).read_text())["model_type"] == "llama" else "GPT-2"
            print(
                f"exported {args.model} -> {out} (Hugging Face {kind}: "
                f"AutoModelForCausalLM.from_pretrained({str(out)!r}), AutoTokenizer.from_pretrained({str(out)!r}))"
            )


if __name__ == "__main__":
    main()
