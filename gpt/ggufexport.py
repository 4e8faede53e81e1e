"""Export one of our models to GGUF, the file llama.cpp (and what is built on it: llama-cpp-python, Ollama,
LM Studio, ...) runs, written through llama.cpp's own Python writer (the `gguf` package).

    export_gguf("runs/<name>/latest/checkpoints/best", "model.gguf", qtype="q8_0")

Two of llama.cpp's architectures compute what our two blocks compute, and each model goes to its own:

- GPT-2's block (learned positions, LayerNorm with bias, tanh GELU) -> llama.cpp's `gpt2`: the fused qkv
  matrix as it is (`blk.N.attn_qkv`), GPT-2's tensors renamed. A model trained with bias=False gets zero
  biases (llama.cpp's gpt2 requires them; adding zero changes nothing).
- Llama's block (RoPE, RMSNorm, SwiGLU; any n_kv_head, biases, tying) -> llama.cpp's `llama`: c_attn split
  into attn_q / attn_k / attn_v and c_fc into ffn_gate / ffn_up. Our RoPE rotates the pair (x[i],
  x[i + d/2]) ("rotate half", as transformers does); llama.cpp's llama rotates neighbours (x[2i], x[2i+1]).
  So the rows of Q and K (weights and biases) are permuted within each head, exactly as llama.cpp's own
  convert_hf_to_gguf.py does for Hugging Face Llamas: then q.k, and so attention, is unchanged.

The tokenizer goes in as llama.cpp's byte-level BPE (`tokenizer.ggml.model = gpt2`, pre-tokenizer
`gpt-2`: GPT-2's regex, which is the one our ByteLevel pre-tokenizer applies), with its vocabulary, merges,
token types (special tokens are control tokens) and <|endoftext|> as BOS and EOS (never added by itself).
A padded vocabulary gets `[PAD<id>]` tokens (unused), as convert_hf_to_gguf.py writes them.

Types (`qtype`): f32; f16 (every matrix in f16); q8_0 (every matrix in 8-bit blocks of 32, one f16 scale
each; a matrix whose rows are not a multiple of 32 falls back to f16). Norms, biases and position embeddings
stay f32 in every type, as llama.cpp's converter keeps them.

What GGUF or llama.cpp cannot compute is refused by name before anything is written: a char-level tokenizer,
the exact (erf) GELU, a mix of the two blocks, a tokenizer that is not GPT-2's byte-level scheme.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from gpt.atomic import atomic_file
from gpt.checkpoint import ADAPTER_CONFIG_FILE, load_model
from gpt.config import GPTConfig
from gpt.errors import GPTError
from gpt.model import GPT
from gpt.tokenizer import EOS, Tokenizer

QTYPES = ("f32", "f16", "q8_0")
GPT2_BLOCK = dict(pos_emb="learned", norm="layernorm", mlp="gelu")
LLAMA_BLOCK = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu")
# Token types of llama.cpp's vocabulary (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
# What our BPE models may carry that llama.cpp's byte-level BPE does not do
BPE_OPTIONS = ("dropout", "byte_fallback", "continuing_subword_prefix", "end_of_word_suffix", "ignore_merges")


# ----------------------------------------------------------------------------------------------------
# What llama.cpp can run


def gguf_arch(config: GPTConfig) -> str:
    """ "gpt2" or "llama": the llama.cpp architecture that computes what this config does; else refused."""
    choices = {k: getattr(config, k) for k in GPT2_BLOCK}
    if choices == LLAMA_BLOCK:
        return "llama"
    if choices == GPT2_BLOCK:
        if config.activation != "gelu_tanh":
            raise GPTError(
                f"this model's MLP uses activation={config.activation!r} (the exact, erf GELU); llama.cpp's gpt2 "
                "architecture computes GELU's tanh form only, so GGUF cannot hold it; export it with "
                "export-hf instead, or train with model.activation=gelu_tanh"
            )
        return "gpt2"
    mine = ", ".join(f"{k}={v}" for k, v in choices.items())
    raise GPTError(
        f"this model ({mine}) is neither GPT-2's block (learned, layernorm, gelu) nor Llama's (rope, rmsnorm, "
        "swiglu): no llama.cpp architecture computes the mix, so export-gguf cannot write it"
    )


def gguf_vocab(tokenizer: Tokenizer, vocab_size: int) -> dict:
    """The tokenizer as llama.cpp's byte-level BPE: tokens, token types and merges (a padded vocabulary gets
    unused `[PAD<id>]` tokens). Anything else (char-level, another pre-tokenizer, a normalizer) is refused."""
    spec = json.loads(tokenizer.to_str())
    model, pre, dec = spec.get("model") or {}, spec.get("pre_tokenizer") or {}, spec.get("decoder") or {}
    if model.get("type") != "BPE":
        kind = "char-level" if model.get("type") == "WordLevel" else f"a {model.get('type')} model"
        raise GPTError(
            f"the tokenizer is {kind}; llama.cpp has no such tokenizer type (GGUF holds byte-level BPE for our "
            "models), so it cannot be exported; train the model with a BPE tokenizer (data.tokenizer=bpe)"
        )
    why = None
    if spec.get("normalizer") is not None:
        why = f"a {spec['normalizer'].get('type')} normalizer"
    elif pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        why = f"the pre-tokenizer {pre.get('type')!r} (not ByteLevel with GPT-2's regex)"
    elif pre.get("add_prefix_space"):
        why = "add_prefix_space=true (llama.cpp's gpt2 pre-tokenizer adds no space)"
    elif dec.get("type") != "ByteLevel":
        why = f"the decoder {dec.get('type')!r} (not ByteLevel)"
    elif any(model.get(k) for k in BPE_OPTIONS):
        why = "BPE option " + ", ".join(f"{k}={model[k]!r}" for k in BPE_OPTIONS if model.get(k))
    if why is None:
        from tokenizers import pre_tokenizers

        vocab = tokenizer.hf.get_vocab(with_added_tokens=False)
        missing = sorted(c for c in pre_tokenizers.ByteLevel.alphabet() if c not in vocab)
        if missing:
            why = f"{len(missing)} of the 256 byte tokens missing (e.g. {missing[0]!r})"
    if why is not None:
        raise GPTError(
            f"the tokenizer is BPE but not GPT-2's byte-level scheme ({why}); llama.cpp would split text "
            "differently, so it cannot be exported; use a tokenizer trained by this tool (data.tokenizer=bpe)"
        )
    if tokenizer.eos_id is None:
        raise GPTError(f"the tokenizer has no {EOS} token (ours ends every text with it); re-export the model")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        token = tokenizer.hf.id_to_token(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(token)
            types.append(NORMAL if i not in added else CONTROL if added[i].get("special") else USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges, "eos": tokenizer.eos_id}


# ----------------------------------------------------------------------------------------------------
# Tensors


def rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a Q or K projection (weight or bias) from the rotate-half layout (dimension i pairs with
    i + d/2 in each head) to the interleaved one llama.cpp's llama rotates (2i pairs with 2i + 1)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gpt2_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """llama.cpp's gpt2 tensors (nn.Linear's (out, in) layout is GGUF's too; biases required by llama.cpp)."""
    c, state = model.config, model.state_dict()
    # llama.cpp's gpt2 requires every bias: a model trained with bias=False gets zeros (adding 0 changes nothing)
    bias = lambda name: state.get(f"{name}.bias", torch.zeros(state[f"{name}.weight"].shape[0]))
    get = lambda name, kind: bias(name) if kind == "bias" else state[f"{name}.weight"]
    out = {"token_embd.weight": state["transformer.wte.weight"]}
    out["position_embd.weight"] = state["transformer.wpe.weight"]
    for i in range(c.n_layer):
        ours = f"transformer.h.{i}."
        for theirs, name in (
            ("attn_norm", "ln_1"),
            ("attn_qkv", "attn.c_attn"),
            ("attn_output", "attn.c_proj"),
            ("ffn_norm", "ln_2"),
            ("ffn_up", "mlp.c_fc"),
            ("ffn_down", "mlp.c_proj"),
        ):
            for kind in ("weight", "bias"):
                out[f"blk.{i}.{theirs}.{kind}"] = get(ours + name, kind)
    out["output_norm.weight"] = state["transformer.ln_f.weight"]
    out["output_norm.bias"] = bias("transformer.ln_f")
    if not c.tie_embeddings:  # tied: llama.cpp reads token_embd as the output layer when `output` is absent
        out["output.weight"] = state["lm_head.weight"]
    return out


def llama_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """llama.cpp's llama tensors: Q, K, V and gate, up split apart; Q and K rows permuted for its RoPE."""
    c, state = model.config, model.state_dict()
    widths = model.transformer.h[0].attn.split
    out = {"token_embd.weight": state["transformer.wte.weight"]}
    for i in range(c.n_layer):
        ours, blk = f"transformer.h.{i}.", f"blk.{i}."
        out[blk + "attn_norm.weight"] = state[ours + "ln_1.weight"]
        out[blk + "ffn_norm.weight"] = state[ours + "ln_2.weight"]
        for kind in ("weight", "bias") if c.bias else ("weight",):
            q, k, v = state[f"{ours}attn.c_attn.{kind}"].split(widths)
            gate, up = state[f"{ours}mlp.c_fc.{kind}"].chunk(2)
            out.update(
                {
                    f"{blk}attn_q.{kind}": rope_permute(q, c.n_head),
                    f"{blk}attn_k.{kind}": rope_permute(k, c.kv_heads),
                    f"{blk}attn_v.{kind}": v,
                    f"{blk}attn_output.{kind}": state[f"{ours}attn.c_proj.{kind}"],
                    f"{blk}ffn_gate.{kind}": gate,
                    f"{blk}ffn_up.{kind}": up,
                    f"{blk}ffn_down.{kind}": state[f"{ours}mlp.c_proj.{kind}"],
                }
            )
    out["output_norm.weight"] = state["transformer.ln_f.weight"]
    if not c.tie_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    return out


def tensor_type(name: str, array: np.ndarray, qtype: str):
    """(data, GGMLQuantizationType) of one tensor as convert_hf_to_gguf.py would store it for `qtype`."""
    from gguf import GGMLQuantizationType as T
    from gguf import QuantError, quants

    if qtype == "f32" or array.ndim < 2 or name.endswith("_norm.weight") or name == "position_embd.weight":
        return array, T.F32
    if qtype == "q8_0":
        try:
            return quants.quantize(array, T.Q8_0), T.Q8_0
        except QuantError:  # rows that are not a multiple of the 32-value block
            pass
    return array.astype(np.float16), T.F16


# ----------------------------------------------------------------------------------------------------
# Loading and writing


def load_for_export(model_path: Path) -> tuple[GPT, Tokenizer]:
    """A model directory or .ckpt as it is; a LoRA adapter directory on its recorded base, merged."""
    if (model_path / ADAPTER_CONFIG_FILE).is_file():
        from gpt.adapter import load_adapter, merge

        peft_model, tokenizer, _ = load_adapter(model_path)
        return merge(peft_model), tokenizer
    return load_model(model_path)


def chat_template(model_path: Path) -> Optional[str]:
    """The Jinja chat template a chat fine-tune stored beside the model (tokenizer_config.json), if any, read as
    sampling and serving read it (a broken file is refused, not skipped)."""
    from gpt.prompts import ChatTemplate

    return ChatTemplate.for_model(model_path).jinja or None


def check_output_file(out: Path, source: Path, force: bool) -> Path:
    """A .gguf file path that replaces nothing by mistake: never a directory, an existing file only with force."""
    if not source.exists():
        raise GPTError(f"{source} does not exist; point at a model directory, a .ckpt or a LoRA adapter directory")
    if out.suffix != ".gguf":
        raise GPTError(f"the output {out} must be a file name ending in .gguf (e.g. {out.with_suffix('.gguf').name})")
    out = out.resolve()
    if out.is_dir():
        raise GPTError(f"{out} is a directory; give a file path for the output (e.g. {out / 'model.gguf'})")
    if out.exists() and not force:
        raise GPTError(f"{out} exists; choose another file name, or pass --force to replace it")
    if out.exists() and not out.is_file():
        raise GPTError(f"{out} is not a regular file; choose another file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GPTError(f"cannot create {out.parent} ({e.strerror}); choose a directory you can write to") from None
    return out


def export_gguf(model_path: str | Path, out_file: str | Path, qtype: str = "f32", force: bool = False) -> Path:
    """One of our models (exported dir, .ckpt, or LoRA adapter dir: merged) -> a GGUF file llama.cpp runs.
    qtype: f32, f16 or q8_0. Everything is checked before the file is written (atomically: a temporary
    name, renamed into place). Returns the path written."""
    if qtype not in QTYPES:
        raise GPTError(f"qtype must be one of {list(QTYPES)} (got {qtype!r})")
    model_path = Path(model_path)
    out = check_output_file(Path(out_file), model_path, force)
    model, tokenizer = load_for_export(model_path)
    c = model.config
    arch = gguf_arch(c)
    vocab = gguf_vocab(tokenizer, c.vocab_size)
    model = model.float()
    with torch.no_grad():
        tensors = gpt2_tensors(model) if arch == "gpt2" else llama_tensors(model)
        arrays = {name: t.detach().cpu().float().contiguous().numpy() for name, t in tensors.items()}
    typed = {name: tensor_type(name, a, qtype) for name, a in arrays.items()}
    write_gguf(out, arch, c, vocab, typed, qtype, name=model_path.resolve().name, template=chat_template(model_path))
    return out


def write_gguf(out: Path, arch: str, c: GPTConfig, vocab: dict, typed: dict, qtype: str, name: str, template) -> None:
    import gguf
    from gguf.gguf_writer import WriterState

    w = gguf.GGUFWriter(None, arch)
    w.add_name(name)
    types = gguf.LlamaFileType
    w.add_file_type({"f32": types.ALL_F32, "f16": types.MOSTLY_F16, "q8_0": types.MOSTLY_Q8_0}[qtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(c.block_size)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_block_count(c.n_layer)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.kv_heads)
    w.add_vocab_size(c.vocab_size)
    if arch == "gpt2":
        w.add_layer_norm_eps(c.norm_eps)
    else:
        w.add_layer_norm_rms_eps(c.norm_eps)
        w.add_rope_freq_base(c.rope_theta)
        w.add_rope_dimension_count(c.head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    w.add_bos_token_id(vocab["eos"])
    w.add_eos_token_id(vocab["eos"])
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    if template:
        w.add_chat_template(template)
    for tensor_name, (data, dtype) in typed.items():
        w.add_tensor(tensor_name, data, raw_dtype=dtype)
    with atomic_file(out) as f:
        w.fout, w.state = [f], WriterState.EMPTY  # the writer's file: atomic_file's temporary one
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.fout = None  # atomic_file closes it, after fsync


# ----------------------------------------------------------------------------------------------------
# What `python -m gpt.convert export-gguf` adds to its command line (gpt/convert.py owns the parser)


def describe(path: Path) -> str:
    """One line about a written GGUF file: architecture, type, size, and how to run it."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    arch = r.fields["general.architecture"].contents()
    kinds = sorted({t.tensor_type.name for t in r.tensors})
    return (
        f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB; llama.cpp architecture {arch}, tensors "
        f"{'/'.join(kinds)}); run it: llama-cli -m {path}, or llama_cpp.Llama(model_path={str(path)!r})"
    )


def add_arguments(parser) -> None:
    """The export-gguf arguments, for an argparse (sub)parser."""
    parser.add_argument("model", help="an exported model directory, a .ckpt, or a LoRA adapter directory (merged)")
    parser.add_argument("out", help="the .gguf file to write")
    parser.add_argument("--qtype", choices=QTYPES, default="f32", help="weight type (default f32)")
    parser.add_argument("--force", action="store_true", help="replace the output file if it exists")
