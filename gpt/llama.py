"""Hugging Face's LlamaForCausalLM <-> our GPT with Llama's block (pos_emb=rope, norm=rmsnorm, mlp=swiglu):
the config mapping, and the weight names (q/k/v and gate/up are stacked in our c_attn and c_fc; RoPE is the
rotate-half layout on both sides, so no permutation). Anything our model cannot represent is refused by name.
Also the checks every Hugging Face import passes, GPT-2 or Llama: no quantized or integer weights (a cast to
float would drop their scales), and sizes this machine can hold (weights plus one sequence's KV cache).
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch
from transformers import LlamaConfig

from gpt.checkpoint import check_tensors
from gpt.config import GPTConfig
from gpt.errors import GPTError
from gpt.memory import count_parameters, physical_memory
from gpt.model import GPT
from gpt.tokenizer import Tokenizer

LLAMA_ARCHITECTURES = ("LlamaForCausalLM",)
# Constants older transformers versions saved with Llama checkpoints (recomputed from rope_theta, as we do)
ROTARY_BUFFER = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
LLAMA_BLOCK = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu")  # the block LlamaForCausalLM computes
# config.json's name for each of our size fields: GPT-2's, Llama's
SIZE_KEYS = {
    "block_size": ("n_positions", "max_position_embeddings"),
    "vocab_size": ("vocab_size", "vocab_size"),
    "n_layer": ("n_layer", "num_hidden_layers"),
    "n_embd": ("n_embd", "hidden_size"),
    "mlp_hidden": (None, "intermediate_size"),
}
LINEAR = ("block_size", "vocab_size", "n_layer")  # what the memory needed grows with in proportion


def llama_names(config: GPTConfig) -> list[tuple[str, tuple[str, ...]]]:
    """(our tensor, the LlamaForCausalLM tensors it stacks along dim 0), for every tensor of the model."""
    names = [
        ("transformer.wte.weight", ("model.embed_tokens.weight",)),
        ("transformer.ln_f.weight", ("model.norm.weight",)),
    ]
    if not config.tie_embeddings:
        names.append(("lm_head.weight", ("lm_head.weight",)))
    for i in range(config.n_layer):
        ours, hf = f"transformer.h.{i}.", f"model.layers.{i}."
        names += [
            (ours + "ln_1.weight", (hf + "input_layernorm.weight",)),
            (ours + "ln_2.weight", (hf + "post_attention_layernorm.weight",)),
        ]
        for kind in ("weight", "bias") if config.bias else ("weight",):
            names += [
                (f"{ours}attn.c_attn.{kind}", tuple(f"{hf}self_attn.{x}_proj.{kind}" for x in "qkv")),
                (f"{ours}attn.c_proj.{kind}", (f"{hf}self_attn.o_proj.{kind}",)),
                (f"{ours}mlp.c_fc.{kind}", (f"{hf}mlp.gate_proj.{kind}", f"{hf}mlp.up_proj.{kind}")),
                (f"{ours}mlp.c_proj.{kind}", (f"{hf}mlp.down_proj.{kind}",)),
            ]
    return names


def llama_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under LlamaForCausalLM's names (a tied lm_head left out, as transformers saves it)."""
    c, state = model.config, model.state_dict()
    widths = {3: model.transformer.h[0].attn.split, 2: (c.hidden_dim, c.hidden_dim), 1: None}
    out = {}
    for ours, theirs in llama_names(c):
        pieces = state[ours].split(widths[len(theirs)]) if len(theirs) > 1 else (state[ours],)
        out.update((name, piece.contiguous()) for name, piece in zip(theirs, pieces))
    return out


def state_from_llama(state: dict[str, torch.Tensor], config: GPTConfig, source: str) -> dict[str, torch.Tensor]:
    """A LlamaForCausalLM state dict in our names and layout, checked strictly."""
    state = {k: v for k, v in state.items() if not ROTARY_BUFFER.match(k)}
    lm_head = state.pop("lm_head.weight", None) if config.tie_embeddings else None
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        expected = {k: tuple(v.shape) for k, v in llama_state_dict(GPT(config)).items()}
    check_tensors(expected, state, source, fix="download the checkpoint again (all of its files)")
    if lm_head is not None and not torch.equal(lm_head, state["model.embed_tokens.weight"]):
        raise GPTError(
            f"{source}: 'lm_head.weight' differs from 'model.embed_tokens.weight' but config.json says "
            "tie_word_embeddings=true; set it to false (an untied output layer)"
        )
    return {ours: torch.cat([state[name] for name in theirs]) for ours, theirs in llama_names(config)}


def config_from_llama(raw: dict, source: str) -> GPTConfig:
    """Our GPTConfig for a Hugging Face Llama config.json; what we cannot compute is refused by name."""
    archs = raw.get("architectures") or []
    if [a for a in archs if a not in LLAMA_ARCHITECTURES]:
        raise GPTError(
            f"{source}: architectures {archs} are not supported; import-hf takes a Llama language model "
            f"({' or '.join(LLAMA_ARCHITECTURES)}), without extra heads"
        )
    try:
        hf = LlamaConfig.from_dict(raw)  # transformers' own defaults, and its reading of older rope_* fields
    except Exception as e:  # transformers validates types with its own exception classes
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        raise GPTError(f"{source} is not a valid Llama config ({why})") from e
    rope = dict(hf.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
    if rope.get("rope_type") != "default" or set(rope) - {"rope_type", "rope_theta"}:
        raise GPTError(
            f"{source}: rope_scaling / rope_parameters {rope} is not supported (our RoPE is the plain one: "
            "rope_type 'default' with rope_theta); this checkpoint cannot be represented"
        )
    if hf.hidden_act != "silu":
        raise GPTError(f"{source}: hidden_act {hf.hidden_act!r} is not supported (our SwiGLU gates with 'silu')")
    if hf.head_dim != hf.hidden_size // hf.num_attention_heads:
        raise GPTError(
            f"{source}: head_dim={hf.head_dim} is not supported (ours is hidden_size / num_attention_heads "
            f"= {hf.hidden_size // hf.num_attention_heads})"
        )
    if hf.attention_bias != hf.mlp_bias:
        raise GPTError(
            f"{source}: attention_bias={hf.attention_bias} with mlp_bias={hf.mlp_bias} is not supported "
            "(our `bias` is one switch for every projection)"
        )
    return GPTConfig(
        block_size=hf.max_position_embeddings,
        vocab_size=hf.vocab_size,
        n_layer=hf.num_hidden_layers,
        n_head=hf.num_attention_heads,
        n_kv_head=hf.num_key_value_heads,
        n_embd=hf.hidden_size,
        mlp_hidden=hf.intermediate_size,
        bias=bool(hf.attention_bias),
        rope_theta=float(rope["rope_theta"]),
        norm_eps=float(hf.rms_norm_eps),
        dropout=float(hf.attention_dropout or 0.0),
        tie_embeddings=bool(hf.tie_word_embeddings),
        **LLAMA_BLOCK,
    )


def llama_config(config: GPTConfig, tokenizer: Tokenizer) -> LlamaConfig:
    """The LlamaConfig of one of our Llama-block models."""
    eos = tokenizer.eos_id
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attention_bias=config.bias,
        mlp_bias=config.bias,
        attention_dropout=config.dropout,
        bos_token_id=eos,
        eos_token_id=eos,
        tie_word_embeddings=config.tie_embeddings,
        architectures=list(LLAMA_ARCHITECTURES),
    )


# ----------------------------------------------------------------------------------------------------
# Checks on any import (GPT-2 or Llama)


def check_not_quantized(raw: dict, source: str) -> None:
    q = raw.get("quantization_config")
    if q is not None:
        method = f" (quant_method {q.get('quant_method')!r})" if isinstance(q, dict) and "quant_method" in q else ""
        raise GPTError(
            f"{source} has a quantization_config{method}: quantized checkpoints are not supported (their weights "
            "would be cast to float without their scales); import the unquantized float16/bfloat16/float32 checkpoint"
        )


def check_float_weights(state: dict[str, torch.Tensor], source: str) -> None:
    """Integer, bool or 8-bit float tensors are quantized (or not weights at all): refused, never cast to float."""
    bad = [(k, v.dtype) for k, v in state.items() if not v.is_floating_point() or v.element_size() < 2]
    if bad:
        more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
        raise GPTError(
            f"{source}: tensor {bad[0][0]!r} is {str(bad[0][1]).removeprefix('torch.')}{more}: integer or "
            "quantized weights are not supported (a cast to float would compute something else); import the "
            "float16/bfloat16/float32 checkpoint"
        )


def import_bytes(config: GPTConfig) -> int:
    """Memory a model of this config needs to be used: its weights, and one sequence's KV cache at the full
    context (what generate allocates), in the default dtype."""
    kv = config.n_layer * 2 * config.kv_heads * config.head_dim * config.block_size
    return (count_parameters(config) + kv) * torch.get_default_dtype().itemsize


def check_import_fits(config: GPTConfig, raw: dict, source: str) -> None:
    """A config.json whose sizes this machine could never hold (max_position_embeddings=10**12, say) is refused
    before anything is read or allocated, naming the key that makes it too large and, where the need grows in
    proportion to it, the largest value that fits."""
    have, need = physical_memory(), import_bytes(config)
    if not have or need <= have:
        return
    small = {"n_embd": 2 * config.n_head}  # the smallest width with whole, even heads

    def shrunk(field, value=None):
        return import_bytes(replace(config, **{field: value or small.get(field, 1)}))

    fmt = 1 if raw.get("model_type") == "llama" else 0
    fields = [f for f in SIZE_KEYS if SIZE_KEYS[f][fmt] and getattr(config, f) is not None]
    field = min(fields, key=shrunk)  # the one whose reduction saves the most
    key, base = SIZE_KEYS[field][fmt], shrunk(field)
    bound = ""
    if field in LINEAR and base <= have:
        bound = f"; at most {1 + (have - base) // (shrunk(field, 2) - base):,} fits"
    raise GPTError(
        f"{source}: {key}={raw.get(key, getattr(config, field))} makes the model need {need / 2**30:,.0f} GiB "
        f"(weights plus one sequence's KV cache at its context), more than this machine's "
        f"{have / 2**30:,.0f} GiB of memory{bound}; lower {key} in config.json, or import on a larger machine"
    )
