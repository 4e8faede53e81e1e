"""A GPT language model, written from the math.

Read top to bottom: the config and its named presets, rotary position embeddings, causal self-attention
(an explicit math path and the fused `scaled_dot_product_attention` path over the same weights), the two
MLPs, a pre-norm block, the KV cache, the model, and sampling. Pure PyTorch: no Lightning, no Hydra, no
transformers.

GPT-2's architecture is the default. Each of Llama's changes is a config choice of its own: rotary instead
of learned position embeddings (`pos_emb`), RMSNorm instead of LayerNorm (`norm`), the SiLU-gated MLP
(`mlp`), fewer key/value heads than query heads (`n_kv_head`), no biases (`bias`), an untied output layer
(`tie_embeddings`). Parameter names follow GPT-2 (`transformer.h.0.attn.c_attn.weight`, ...) so released
GPT-2 checkpoints map onto them with a transpose, and Llama's with a concatenation (see `gpt/convert.py`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import types
import weakref
from dataclasses import InitVar, asdict, dataclass, fields, replace
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from gpt.errors import GPTError, is_int, is_number

# ----------------------------------------------------------------------------------------------------
# Configuration

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),  # exact (erf) GELU, as nanoGPT's nn.GELU()
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's "gelu_new"
}
ATTENTION_IMPLS = ("sdpa", "math")
# The architecture choices: the first of each is GPT-2's (the default); the second is Llama's.
POS_EMBS = ("learned", "rope")  # position embeddings added to the input, or rotary embeddings on queries/keys
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")  # GPT-2's GELU MLP (with `activation`), or the SiLU-gated MLP of Llama
# Fields added after config.json files were first written, with the value every earlier file implied.
# An earlier file is one that names the norm's epsilon `layer_norm_eps` (now `norm_eps`).
ADDED_FIELDS = {"n_kv_head": None, "pos_emb": "learned", "rope_theta": 10000.0, "norm": "layernorm",
                "mlp": "gelu", "mlp_hidden": None}


@dataclass
class GPTConfig:
    block_size: int = 1024  # context length: the number of learned position embeddings (RoPE: the KV cache's size)
    vocab_size: Optional[int] = None  # set from the tokenizer when None
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: Optional[int] = None  # key/value heads (grouped-query attention; 1: multi-query); None: n_head
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers (GPT-2 has them; nanoGPT's recipes turn them off)
    pos_emb: str = "learned"  # "learned" (GPT-2) or "rope" (rotary, Llama's rotate-half layout)
    rope_theta: float = 10000.0  # RoPE's base wavelength
    norm: str = "layernorm"  # "layernorm" or "rmsnorm" (RMSNorm has no bias, whatever `bias` says)
    norm_eps: float = 1e-5  # the norm's epsilon (formerly layer_norm_eps, still accepted)
    mlp: str = "gelu"  # "gelu" (GPT-2) or "swiglu" (Llama)
    mlp_hidden: Optional[int] = None  # MLP width; None: 4 * n_embd (gelu), or about 8/3 * n_embd (swiglu, same size)
    activation: str = "gelu_tanh"  # the gelu MLP's: "gelu_tanh" (GPT-2) or "gelu" (exact, nanoGPT)
    attn_impl: str = "sdpa"  # "sdpa" (fused kernel) or "math" (explicit, same result, slower)
    tie_embeddings: bool = True  # lm_head shares wte's matrix; False after merging a LoRA adapter on lm_head
    layer_norm_eps: InitVar[Optional[float]] = None  # the old name of norm_eps (Python code, old config.json files)

    def __post_init__(self, layer_norm_eps):
        problems = []
        if layer_norm_eps is not None:
            if self.norm_eps not in (1e-5, layer_norm_eps):  # 1e-5: norm_eps left at its default
                problems.append(f"layer_norm_eps={layer_norm_eps} and norm_eps={self.norm_eps} disagree; give "
                                "norm_eps only (layer_norm_eps is its old name)")
            self.norm_eps = layer_norm_eps
        for name in ("block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer (got {value!r})")
        for name in ("vocab_size", "n_kv_head", "mlp_hidden"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                problems.append(f"{name} must be a positive integer or null (got {value!r})")
        if not problems and self.n_embd % self.n_head != 0:
            problems.append(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"e.g. n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}"
            )
        if not problems and self.n_head % self.kv_heads != 0:
            problems.append(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head}): each "
                            "key/value head serves an equal group of query heads")
        if not problems and self.pos_emb == "rope" and self.head_dim % 2:
            problems.append(f"pos_emb=rope needs an even head size (n_embd / n_head = {self.head_dim})")
        if not (0.0 <= self.dropout < 1.0):
            problems.append(f"dropout must be in [0, 1) (got {self.dropout})")
        if not is_number(self.norm_eps) or self.norm_eps <= 0:
            problems.append(f"norm_eps must be > 0 (got {self.norm_eps})")
        if not is_number(self.rope_theta) or self.rope_theta <= 1:
            problems.append(f"rope_theta must be a number > 1 (got {self.rope_theta})")
        for name, choices in (("pos_emb", POS_EMBS), ("norm", NORMS), ("mlp", MLPS), ("attn_impl", ATTENTION_IMPLS)):
            if getattr(self, name) not in choices:
                problems.append(f"{name} must be one of {list(choices)} (got {getattr(self, name)!r})")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation must be one of {sorted(ACTIVATIONS)} (got {self.activation!r})")
        if problems:
            raise GPTError("impossible model config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden_dim(self) -> int:
        """The MLP's width. SwiGLU has three matrices, not two: 2/3 of 4 * n_embd (rounded up to a multiple of 8)
        gives it about the GELU MLP's parameter count."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return 4 * self.n_embd if self.mlp == "gelu" else 8 * math.ceil(self.n_embd / 3)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise GPTError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    @staticmethod
    def upgrade_dict(d: dict) -> dict:
        """A saved config in today's field names: a file from before the architecture choices (it names the
        epsilon `layer_norm_eps`) gets GPT-2's value for each field added since, which is what it computed."""
        if "layer_norm_eps" not in d:
            return d
        d = {**ADDED_FIELDS, **d}
        d.setdefault("norm_eps", d.pop("layer_norm_eps"))
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "model config") -> "GPTConfig":
        """A saved config (`to_dict`'s output). Every key that shapes the weights or the math must be there:
        a default in its place (say GELU's tanh form for a model trained with the exact one) would load the
        weights and silently compute something else."""
        d = cls.upgrade_dict(d)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"model_type"})
        if unknown:
            raise GPTError(f"{source} has unknown keys {unknown}; expected a subset of {sorted(known)}")
        missing = sorted(known - set(d) - {"attn_impl", "dropout"})  # those two do not change a trained model
        if missing or d.get("vocab_size") is None:
            raise GPTError(f"{source} lacks {missing or ['vocab_size']}; it was not written by this tool or was "
                           "edited: re-export the model (a Hugging Face GPT-2 or Llama comes in through "
                           "python -m gpt.convert import-hf)")
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        # `model_type` lets PEFT (which reads `model.config`) treat us as a custom model.
        return {"model_type": "gpt", **asdict(self)}


# The old name reads as well as it writes (the InitVar takes it in the constructor; this replaces its class default).
GPTConfig.layer_norm_eps = property(lambda self: self.norm_eps, doc="the old name of norm_eps")


# From the smallest useful model to the four released GPT-2 sizes, and two Llama-style ones. `configs/model/*.yaml`
# mirror these (a test keeps them in step), so `model=<name>` on the command line picks the same shapes.
LLAMA = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False)  # Llama's block (in GPT-2's layout)
PRESETS = {
    "tiny": GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64),  # unit tests, smoke runs
    "mini": GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=128),  # nanoGPT's CPU recipe
    "baby": GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384),  # nanoGPT's "baby GPT"
    "gpt2": GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": GPTConfig(block_size=1024, vocab_size=50257, n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": GPTConfig(block_size=1024, vocab_size=50257, n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPTConfig(block_size=1024, vocab_size=50257, n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # mini's shapes with Llama's block, 2 key/value heads and a wider MLP for the weights they save: mini's size
    "llama_mini": GPTConfig(block_size=64, n_layer=4, n_head=4, n_kv_head=2, n_embd=128, mlp_hidden=384, **LLAMA),
    # HuggingFaceTB/SmolLM2-135M's config.json (135M); its context is 8192: lower block_size to train on shorter
    # windows (a smaller KV cache too)
    "smollm2-135m": GPTConfig(block_size=8192, vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, n_embd=576,
                              mlp_hidden=1536, rope_theta=100000.0, norm_eps=1e-5, **LLAMA),
}


# ----------------------------------------------------------------------------------------------------
# The Transformer


def rope_angles(pos: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles for positions `pos` ((T,) or (B, T)), as (1 or B, T, 1, head_dim) fp32.

    Dimension pair i (of head_dim / 2) turns by pos / theta^(2i / head_dim): fast for the first pairs, slow for
    the last. Computed as Hugging Face's Llama does (the same inverse frequencies, in fp32), so imported
    weights give the same numbers. Recomputed per forward pass (a few small ops): no buffer to keep in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=pos.device) / head_dim))
    angles = pos.reshape(-1, pos.size(-1))[..., None].float() * inv_freq  # (1 or B, T, head_dim / 2)
    angles = torch.cat((angles, angles), dim=-1)[:, :, None]  # the two halves of a head share each angle
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x[i], x[i + head_dim/2]) pair of x (B, T, heads, head_dim) by its angle: the "rotate half"
    layout of Hugging Face's Llama (not the original paper's interleaved pairs), so its q/k weights need no
    permutation. A query at position m and a key at n then score by their offset m - n only."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class CausalSelfAttention(nn.Module):
    """softmax(Q Kᵀ / √d_head + mask) V for every head at once, then a projection back to n_embd.

    With n_kv_head < n_head (grouped-query attention) each key/value head serves n_head / n_kv_head
    consecutive query heads: fewer keys and values to compute and to keep in the KV cache."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        kv_dim = self.n_kv_head * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_dim, bias=config.bias)  # fused Q, K, V
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.split = (config.n_embd, kv_dim, kv_dim)  # the widths of Q, K and V in c_attn's output
        self.dropout = config.dropout
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.use_sdpa = config.attn_impl == "sdpa"

    def forward(self, x, attn_mask=None, is_causal=False, cache=None, layer=0, need_weights=False, rope=None):
        B, T, C = x.shape
        qk, v = self.c_attn(x).split((self.split[0] + self.split[1], self.split[2]), dim=2)
        qk = qk.view(B, T, self.n_head + self.n_kv_head, self.head_dim)
        if rope is not None:  # queries and keys rotated by their absolute positions, before caching
            qk = apply_rope(qk, *rope)
        # (B, T, heads, head_dim) -> (B, heads, T, head_dim): each head attends independently.
        q, k = qk.transpose(1, 2).split((self.n_head, self.n_kv_head), dim=1)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if cache is not None:  # keys/values of earlier positions come from the cache
            k, v = cache.update(layer, k, v)

        weights = None
        # One query (a decode step) takes the explicit product: the fused kernel saves nothing there, and
        # on CPUs its bf16 version is several times slower than these three small ops. So is its bf16
        # backward pass for training-sized blocks on CPUs (2-5x at T = 64..256; it wins from T ~ 512 on).
        slow_fused = q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled() and T < 512
        if need_weights or not self.use_sdpa or T == 1 or slow_fused:
            # The query heads of one group take turns as rows against their shared keys: (B, n_kv, group * T, S),
            # read as (B, n_head, T, S). No copy of the keys and values (with one group this is plain attention).
            S, group = k.size(-2), self.n_head // self.n_kv_head
            q = q.reshape(B, self.n_kv_head, group * T, self.head_dim)
            scores = (q @ k.transpose(-2, -1)).view(B, self.n_head, T, S) * (1.0 / math.sqrt(self.head_dim))
            if is_causal:  # query i (of T) may see keys 0..i; the T queries are the last T of S keys
                attn_mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            weights = F.softmax(scores, dim=-1)
            y = self.attn_dropout(weights).view(B, self.n_kv_head, group * T, S) @ v
            y = y.view(B, self.n_head, T, self.head_dim)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv_head != self.n_head,
            )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y)), (weights if need_weights else None)


class MLP(nn.Module):
    """GPT-2's: Linear, GELU, Linear, 4 * n_embd wide."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.hidden_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.hidden_dim, config.n_embd, bias=config.bias)
        self.act = ACTIVATIONS[config.activation]
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class SwiGLU(nn.Module):
    """Llama's MLP: SiLU(x W_gate) * (x W_up), then W_down. The gate and up projections are one fused Linear
    (c_fc, gate rows first), the down projection is c_proj: the names LoRA's `mlp` target takes."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 2 * config.hidden_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.hidden_dim, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.dropout(self.c_proj(F.silu(gate) * up))


def make_norm(config: GPTConfig) -> nn.Module:
    """LayerNorm (centre, scale, shift) or RMSNorm (scale by the root mean square only; no bias)."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class Block(nn.Module):
    """Pre-norm: normalise the input of each sub-layer, keep the residual stream un-normalised."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else MLP(config)

    def forward(self, x, attn_mask=None, is_causal=False, cache=None, layer=0, need_weights=False, rope=None):
        a, weights = self.attn(self.ln_1(x), attn_mask, is_causal, cache, layer, need_weights, rope)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, weights


class KVCache:
    """Keys and values of the positions seen so far, for every layer, in buffers allocated once.

    Prefill writes the whole prompt in one forward pass; each decode step then writes one position and
    attends over the filled prefix. Nothing is concatenated or re-allocated per token. With left-padded
    batches `valid` remembers which cached positions are padding, and `seen` counts each row's real
    tokens so that position embeddings start at 0 at every row's first real token. With grouped-query
    attention it holds the n_kv_head key/value heads only; with RoPE, keys already rotated by their positions.
    """

    def __init__(self, n_layer: int, max_len: int):
        self.max_len = max_len
        self.k: list[Optional[torch.Tensor]] = [None] * n_layer
        self.v: list[Optional[torch.Tensor]] = [None] * n_layer
        self.length = 0  # positions filled
        self.valid: Optional[torch.Tensor] = None  # (B, max_len) bool, once padding was seen or decoding began
        self.seen: Optional[torch.Tensor] = None  # (B,) real tokens per row, likewise
        self.slot: Optional[torch.Tensor] = None  # (1,) the next column, as a tensor: for GPT.decode_step

    def reset(self):
        self.length, self.valid, self.seen, self.slot = 0, None, None, None

    def start_decoding(self) -> None:
        """Keep the state of one-token decoding in tensors (which columns hold real tokens, each row's count
        of real tokens, the next column), so that every decode step has the same shapes and reads no
        changing Python number: one compiled graph then serves every step (see GPT.decode_step)."""
        B, device = self.k[0].size(0), self.k[0].device
        if self.valid is None:
            self.valid = torch.ones(B, self.max_len, dtype=torch.bool, device=device)
            self.seen = torch.full((B,), self.length, dtype=torch.long, device=device)
        self.valid[:, self.length:] = False  # not written yet: decode_step attends over the whole buffer
        self.slot = torch.tensor([self.length], device=device)

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i continues from row rows[i] (beam search: each new beam extends one old beam)."""
        n = self.length
        for layer in range(len(self.k)):
            if self.k[layer] is not None:
                self.k[layer][:, :, :n] = self.k[layer][rows, :, :n]
                self.v[layer][:, :, :n] = self.v[layer][rows, :, :n]
        if self.valid is not None:
            self.valid, self.seen = self.valid[rows], self.seen[rows]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.slot is not None:  # a decode step: one new column, attention over the whole (masked) buffer
            self.k[layer].index_copy_(2, self.slot, k.to(self.k[layer].dtype))
            self.v[layer].index_copy_(2, self.slot, v.to(self.v[layer].dtype))
            return self.k[layer], self.v[layer]
        if self.k[layer] is None or self.k[layer].dtype != k.dtype:  # allocated lazily: autocast decides dtype
            B, H, _, D = k.shape
            self.k[layer] = k.new_zeros(B, H, self.max_len, D)
            self.v[layer] = v.new_zeros(B, H, self.max_len, D)
        end = self.length + k.size(2)
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class GPTOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, vocab), or (B, 1, vocab) with only_last=True
    loss: Optional[torch.Tensor] = None  # mean cross-entropy over targets != -100
    attentions: Optional[list] = None  # per layer (B, n_head, T, S) softmax weights, with need_weights=True


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.vocab_size is None:
            raise GPTError("GPTConfig.vocab_size is not set: take it from the tokenizer (tokenizer.vocab_size)")
        self.config = config
        layers = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))  # token embeddings
        if config.pos_emb == "learned":  # RoPE instead rotates queries and keys in every layer: no weights
            layers["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(dict(
            **layers,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: reading a token in and writing it out share one matrix (fewer parameters, and it
        # helps small models). The state dict still lists both names; they are the same tensor.
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight

        self.apply(self._init_weights)
        # GPT-2: residual projections are scaled by 1/√(2·n_layer) so the residual stream's variance does
        # not grow with depth (each block adds two of them).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings are left out by default (the token embedding is the LM head)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding and "wpe" in self.transformer else n

    def flops_per_token(self, seq_len: Optional[int] = None) -> int:
        """Training FLOPs per token (forward + backward): 6·N for the matmuls + 12·L·C·T for attention."""
        T = seq_len or self.config.block_size
        return 6 * self.num_params() + 12 * self.config.n_layer * self.config.n_embd * T

    def embed(self, idx: torch.Tensor, pos: torch.Tensor):
        """The input of the first block for tokens idx at positions pos, and RoPE's (cos, sin) (None without)."""
        x = self.transformer.wte(idx)
        if self.config.pos_emb == "rope":
            return x, rope_angles(pos, self.config.head_dim, self.config.rope_theta)
        return x + self.transformer.wpe(pos), None

    def new_cache(self) -> KVCache:
        return KVCache(self.config.n_layer, self.config.block_size)

    def forward(self, idx, targets=None, *, attention_mask=None, cache: Optional[KVCache] = None,
                need_weights: bool = False, only_last: bool = False) -> GPTOutput:
        """idx: (B, T) token ids. targets: (B, T) ids to predict, -100 where no loss is wanted.

        attention_mask: (B, T), 1 for real tokens and 0 for (left) padding. With a cache, the new tokens
        are appended after the cached ones.
        """
        B, T = idx.shape
        if cache is not None:
            cache.slot = None  # variable-length calls append after `length`; decode_step needs start_decoding()
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise GPTError(
                f"sequence of {start + T} tokens is longer than the model's context ({self.config.block_size}); "
                "shorten the input (or crop it to the last block_size tokens)"
            )
        pos, attn_mask, is_causal = self._positions_and_mask(B, T, start, attention_mask, cache, idx.device)

        x, rope = self.embed(idx, pos)
        x = self.transformer.drop(x)
        attentions = [] if need_weights else None
        for layer, block in enumerate(self.transformer.h):
            x, weights = block(x, attn_mask, is_causal, cache, layer, need_weights, rope)
            if need_weights:
                attentions.append(weights)
        if cache is not None:
            cache.length += T
        x = self.transformer.ln_f(x)
        if only_last:  # generation needs only the next-token distribution: skip the rest of the LM head
            x = x[:, -1:]
        logits = self.lm_head(x)

        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return GPTOutput(logits, loss, attentions)

    def decode_step(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, vocab) of one new token per row (idx: (B, 1)) that follows the cached ones.

        forward() with a cache does the same with shapes that grow by one every token. Here they never
        change: the new keys/values go to column cache.slot, attention runs over the whole buffer under
        the mask of filled columns (cache.valid), and the bookkeeping (slot, valid, per-row positions
        cache.seen) moves in place in tensors. So torch.compile makes one graph for all steps, with no
        Python per layer (generate(compile=True)). Call cache.start_decoding() first; the caller counts
        cache.length.
        """
        cache.valid.index_fill_(1, cache.slot, True)
        x, rope = self.embed(idx, cache.seen[:, None])
        mask = cache.valid[:, None, None, :]  # (B, 1, 1, max_len): each row sees its filled, real columns
        for layer, block in enumerate(self.transformer.h):
            x, _ = block(x, mask, False, cache, layer, rope=rope)
        cache.seen.add_(1)
        cache.slot.add_(1)
        return self.lm_head(self.transformer.ln_f(x))[:, -1]

    @staticmethod
    def _positions_and_mask(B, T, start, attention_mask, cache, device):
        """Position ids and the attention mask for T new tokens that follow `start` cached ones.

        Returns (pos, attn_mask, is_causal). Without padding the mask is left implicit so SDPA can use its
        fastest kernels; with padding it is an explicit boolean (B, 1, T, S) mask, True = may attend.
        """
        padded = attention_mask is not None or (cache is not None and cache.valid is not None)
        if not padded:
            pos = torch.arange(start, start + T, device=device)
            if start == 0:
                return pos, None, True  # plain causal attention over the new tokens
            if T == 1:
                return pos, None, False  # one new token may see every cached key
            S = start + T
            return pos, torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=start), False

        new = torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
        seen = torch.zeros(B, dtype=torch.long, device=device)
        keys_valid = new
        if cache is not None:
            if cache.valid is None:  # first padded call: everything cached so far was real
                cache.valid = torch.ones(B, cache.max_len, dtype=torch.bool, device=device)
                cache.seen = torch.full((B,), start, dtype=torch.long, device=device)
            cache.valid[:, start:start + T] = new
            keys_valid, seen = cache.valid[:, :start + T], cache.seen
            cache.seen = seen + new.sum(1)
        # Each row's positions count only its real tokens, so a left-padded prompt gets the same position
        # embeddings (or rotations) as the unpadded one.
        pos = (seen[:, None] + new.long().cumsum(1) - 1).clamp(min=0)
        S = start + T
        causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=start)
        mask = causal[None] & keys_valid[:, None, :]
        # A padding query would see no key at all (softmax over all -inf is NaN, and NaN leaks through
        # 0·NaN in the next layer). Let every query see itself; padding outputs are never used.
        mask |= torch.eye(T, S, dtype=torch.bool, device=device).roll(start, dims=1)[None]
        return pos, mask[:, None], False

    # ------------------------------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, *, attention_mask=None, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, eos_token_id: Optional[int] = None,
                 generator=None, on_context_full: str = "slide",
                 on_token: Optional[Callable[[torch.Tensor], object]] = None,
                 no_repeat_ngram_size: int = 0, logit_bias: Optional[torch.Tensor] = None,
                 compile: bool = False) -> torch.Tensor:
        """Continue each row of idx (B, T) by up to max_new_tokens tokens; returns the new tokens (B, n).

        Batches of different-length prompts are left-padded with attention_mask marking real tokens.
        temperature 0 is greedy decoding. Rows that produced `eos_token_id` are filled with it afterwards,
        and generation ends when every row has. When the context (block_size) is full: "stop" ends
        generation there; "slide" keeps the most recent 3/4 of the context, re-encodes it in one pass
        and goes on (what nanoGPT's crop-to-block_size does, without recomputing on every token).
        on_token(new_tokens) may return True (stop now) or a (B,) bool tensor (these rows are done).
        no_repeat_ngram_size n > 0: never generate an n-gram that the row has already generated (the
        prompt does not count, so copying from it stays possible); breaks greedy repetition loops.
        logit_bias (B, V) is added to every step's logits (e.g. a bonus for the words of each row's input).
        generator: a torch.Generator for the batch, or a list of B (each row its own random stream).
        The prompt is read in one pass; each new token then takes one fixed-shape decode_step, compiled
        with compile=True (worth its one-off compilation time when many tokens are generated).
        """
        check_sampling_args(max_new_tokens, temperature, top_k, top_p)
        if not isinstance(no_repeat_ngram_size, int) or no_repeat_ngram_size < 0:
            raise GPTError(f"no_repeat_ngram_size must be an integer >= 0 (got {no_repeat_ngram_size!r}); 0 = off")
        if on_context_full not in ("slide", "stop"):
            raise GPTError(f"on_context_full must be 'slide' or 'stop' (got {on_context_full!r})")
        B, T = idx.shape
        block = self.config.block_size
        if T > block:
            raise prompt_too_long(T, block)
        if T == 0:
            raise GPTError("prompt is empty: give at least one token (e.g. a newline)")
        # All tokens (prompt + generated) live in one preallocated buffer: sliding needs the recent ones.
        tokens = idx.new_empty(B, T + max_new_tokens)
        tokens[:, :T] = idx
        real = None
        if attention_mask is not None:
            real = torch.ones(B, T + max_new_tokens, dtype=torch.bool, device=idx.device)
            real[:, :T] = attention_mask.bool()
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)

        cache = self.new_cache()
        logits = self(idx, attention_mask=attention_mask, cache=cache, only_last=True).logits[:, -1]
        cache.start_decoding()
        decode_step = compiled_decode_step(self) if compile else GPT.decode_step
        # Compiled: Dynamo checks its guards (model, shapes, dtypes) on the first decode step; the later steps
        # of this loop change none of them, so they skip the check (~0.1 ms per token). (set_stance takes
        # effect when called, so each step calls it in its `with`; eager decoding never loads Dynamo.)
        guards = contextlib.nullcontext
        skip_guards = functools.partial(torch.compiler.set_stance, skip_guard_eval_unsafe=True) if compile else guards
        n = T
        for step in range(max_new_tokens):
            if logit_bias is not None:
                logits = logits + logit_bias
            if no_repeat_ngram_size:
                logits = ban_repeated_ngrams(logits, tokens[:, T:n], no_repeat_ngram_size)
            nxt = sample_next_token(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
                finished |= nxt == eos_token_id
            tokens[:, n] = nxt
            n += 1
            if on_token is not None:  # True: stop now; a (B,) bool tensor: these rows are done
                stop = on_token(nxt)
                if stop is True:
                    break
                if isinstance(stop, torch.Tensor):
                    finished |= stop
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            if cache.length < block:
                with guards():
                    logits = decode_step(self, nxt[:, None], cache)
                guards = skip_guards
                cache.length += 1
            elif on_context_full == "stop":
                break
            else:
                keep = max(1, (3 * block) // 4)
                cache.reset()
                window_mask = None if real is None else real[:, n - keep:n]
                logits = self(tokens[:, n - keep:n], attention_mask=window_mask, cache=cache,
                              only_last=True).logits[:, -1]
                cache.start_decoding()
        return tokens[:, T:n]

    @torch.no_grad()
    def beam_search(self, idx, max_new_tokens: int, *, num_beams: int, eos_token_id: int, attention_mask=None,
                    length_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                    logit_bias: Optional[torch.Tensor] = None, stop_token_ids: Sequence[int] = ()) -> torch.Tensor:
        """The most likely continuation of each row of idx (B, T) found by beam search; returns (B, n) new
        tokens, padded with eos_token_id after the end.

        Each row keeps `num_beams` partial continuations. At every step all beams of a row are extended
        by every token; the `num_beams` best (by summed log-probability) survive, and the KV cache rows
        follow them. A beam that emits EOS is finished and scored by log-probability / length**length_penalty
        (so longer outputs are not penalised just for having more terms). A row stops once it holds
        `num_beams` finished continuations; the best one wins. num_beams=1 is greedy decoding.
        A token of `stop_token_ids` (e.g. one that contains a stop string) also finishes a beam, and is kept.
        """
        check_sampling_args(max_new_tokens, 0.0)
        if not isinstance(num_beams, int) or num_beams < 1:
            raise GPTError(f"num_beams must be a positive integer (got {num_beams!r}); 1 = greedy")
        B, T = idx.shape
        K, block = num_beams, self.config.block_size
        if T > block:
            raise prompt_too_long(T, block)
        max_new_tokens = min(max_new_tokens, block - T + 1)  # the last new token is predicted, never fed back
        rows = torch.arange(B, device=idx.device).repeat_interleave(K)  # beam b*K + k belongs to row b
        cache = self.new_cache()
        mask = attention_mask[rows] if attention_mask is not None else None
        logits = self(idx[rows], attention_mask=mask, cache=cache, only_last=True).logits[:, -1]
        scores = torch.zeros(B, K, device=idx.device)
        scores[:, 1:] = float("-inf")  # all beams start identical: let only the first one expand at step 0
        tokens = idx.new_full((B * K, max_new_tokens), eos_token_id)
        finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(B)]
        active = [True] * B
        written = 0  # generated positions filled in `tokens`
        bias = logit_bias[rows] if logit_bias is not None else None
        ends = set(stop_token_ids)
        for step in range(max_new_tokens):
            if bias is not None:
                logits = logits + bias
            if no_repeat_ngram_size:
                logits = ban_repeated_ngrams(logits, tokens[:, :step], no_repeat_ngram_size)
            logp = F.log_softmax(logits.float(), dim=-1)  # (B*K, V)
            V = logp.size(-1)
            cand = (scores.view(-1, 1) + logp).view(B, K * V)
            top_scores, top = cand.topk(2 * K, dim=-1)  # 2K: up to K of them may end in EOS
            next_beam = torch.zeros(B, K, dtype=torch.long, device=idx.device)
            next_token = torch.full((B, K), eos_token_id, dtype=torch.long, device=idx.device)
            next_scores = torch.full((B, K), float("-inf"), device=idx.device)
            for b in range(B):
                if not active[b]:
                    continue
                kept = 0
                for score, flat in zip(top_scores[b].tolist(), top[b].tolist()):
                    beam, token = divmod(flat, V)
                    if score == float("-inf"):
                        break
                    if token == eos_token_id or token in ends:  # a finished continuation
                        seq = tokens[b * K + beam, :step].clone()
                        if token != eos_token_id:  # a stop token is part of the text
                            seq = torch.cat([seq, seq.new_tensor([token])])
                        finished[b].append((score / max(1, step + 1) ** length_penalty, seq))
                    else:
                        next_beam[b, kept], next_token[b, kept], next_scores[b, kept] = beam, token, score
                        kept += 1
                    if kept == K:
                        break
                if len(finished[b]) >= K or kept == 0:
                    active[b] = False
            src = (torch.arange(B, device=idx.device)[:, None] * K + next_beam).view(-1)
            tokens = tokens[src]
            tokens[:, step] = next_token.view(-1)
            written, scores = step + 1, next_scores
            if not any(active) or step == max_new_tokens - 1:
                break
            cache.reorder(src)
            logits = self(next_token.view(-1, 1), cache=cache, only_last=True).logits[:, -1]

        out = idx.new_full((B, max_new_tokens), eos_token_id)
        for b in range(B):
            if active[b]:  # max_new_tokens ran out: the running beams compete with the finished ones, scored alike
                finished[b] += [(score / max(1, written) ** length_penalty, tokens[b * K + k, :written])
                                for k, score in enumerate(scores[b].tolist()) if score != float("-inf")]
            best = max(finished[b], key=lambda hyp: hyp[0])[1]
            out[b, :len(best)] = best
        return out


_COMPILED_DECODE_STEPS: "weakref.WeakKeyDictionary[GPT, tuple]" = weakref.WeakKeyDictionary()


def is_plain(weight) -> bool:
    """A weight stored as an ordinary tensor (not a quantized tensor subclass)."""
    return type(weight) in (torch.Tensor, nn.Parameter)


class RowTimesWeights(TorchFunctionMode):
    """While active, F.linear of a single row with a plain weight is written as sum(W * x) along the rows.

    Decoding one token makes every Linear a matrix-vector product that reads each weight once, so its speed is
    the rate at which the weights stream through the CPU. On the benchmark CPU (README, Benchmark) the matmul
    library (oneDNN, even with pre-packed weights) reads bf16 weights at ~30 GB/s; inductor's own loop for this
    reduction (one output per weight row, vectorized along the row, rows split between the threads, fp32
    accumulation like the library's) reads ~70 GB/s. Only for compiled decoding: eager, the same expression
    would build the whole W * x. Weights of other types (torchao's int8 tensors) keep their own kernels.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[:2]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.numel() == x.size(-1) and is_plain(weight):
                y = (weight.float() * x.reshape(1, -1).float()).sum(-1)
                if bias is not None:
                    y = y + bias.float()
                return y.to(x.dtype).reshape(*x.shape[:-1], weight.size(0))
        return func(*args, **kwargs)


def compiled_decode_step(model: GPT) -> Callable:
    """GPT.decode_step through torch.compile, for this model's current weights.

    One row (batch 1) on a CPU: every Linear is a matrix-vector product, which inductor generates itself
    (RowTimesWeights). Its `deterministic` flag makes it store a product's input vector (e.g. a LayerNorm's
    output) once, instead of recomputing it for every weight row that reads it.
    Several rows, quantized weights or a GPU: inductor's freezing folds the weights into the compiled graph as
    constants, which lets it store them pre-packed in oneDNN's blocked layout (read about twice as fast as
    plain bf16 weights by oneDNN).
    Constants do not follow later in-place changes (an optimizer step, a LoRA merge), so the compiled step
    is kept per model together with a fingerprint of its tensors (identity and version counter) and is
    compiled afresh when that changes. Each compilation gets its own copy of the function's code object
    because Dynamo keeps its cache on the code object: an old model's frozen graph is never reused, and it is
    freed together with its copy.
    """
    tensors = [*model.parameters(), *model.buffers()]
    fingerprint = tuple((id(t), t._version, t.dtype, t.device) for t in tensors)
    entry = _COMPILED_DECODE_STEPS.get(model)
    if entry is None or entry[0] != fingerprint:
        fn = GPT.decode_step
        fresh = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)
        compiled = torch.compile(fresh, fullgraph=True, dynamic=False)
        plain = all(is_plain(m.weight) for m in model.modules() if isinstance(m, nn.Linear))
        # Made once: a patch builds a class when made. Shapes never change within generate(), whose later steps
        # skip Dynamo's guards as well, so the row path also drops the per-call size checks of ~100 inputs.
        # (Flags an older torch lacks are left out: they change speed, not results.)
        row_flags = torch._inductor.config.patch({key: value for key, value in (("deterministic", True),
                                                  ("size_asserts", False)) if hasattr(torch._inductor.config, key)})
        frozen_flags = torch._inductor.config.patch(freezing=True)

        def step(model, idx, cache):  # Dynamo reads the mode and flags while tracing, inductor while compiling
            if plain and idx.size(0) == 1 and idx.device.type == "cpu":  # measured on CPUs only
                with RowTimesWeights(), row_flags:
                    return compiled(model, idx, cache)
            with frozen_flags:
                return compiled(model, idx, cache)

        entry = (fingerprint, step)
        _COMPILED_DECODE_STEPS[model] = entry
    return entry[1]


def ban_repeated_ngrams(logits: torch.Tensor, generated: torch.Tensor, n: int) -> torch.Tensor:
    """-inf for each token that would complete an n-gram already in its row of `generated` (B, L)."""
    B, L = generated.shape
    if L < n:
        return logits
    ngrams = generated.unfold(1, n, 1)  # (B, L - n + 1, n): every n-gram so far
    last = generated[:, L - n + 1:]  # (B, n - 1): what the next token would extend
    seen = (ngrams[:, :, :-1] == last[:, None, :]).all(-1)  # n-grams that start the same way
    rows, at = seen.nonzero(as_tuple=True)
    logits = logits.clone()
    logits[rows, ngrams[rows, at, -1]] = float("-inf")
    return logits


def prompt_too_long(n_tokens: int, block_size: int, which: str = "prompt") -> GPTError:
    return GPTError(f"{which} is {n_tokens} tokens but the model's context is {block_size}: shorten the prompt")


def check_sampling_args(max_new_tokens, temperature, top_k=None, top_p=None, prefix: str = ""):
    """prefix: where the settings live in the config (e.g. "log_samples."), for the messages."""
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise GPTError(f"{prefix}max_new_tokens must be a positive integer (got {max_new_tokens!r})")
    if not is_number(temperature) or not 0 <= temperature < math.inf:
        raise GPTError(f"{prefix}temperature must be a number >= 0 (got {temperature!r}); use 0 for greedy decoding")
    if top_k is not None and (not is_int(top_k) or top_k <= 0):
        raise GPTError(f"{prefix}top_k must be a positive integer or null (got {top_k!r})")
    if top_p is not None and not (is_number(top_p) and 0.0 < top_p <= 1.0):
        raise GPTError(f"{prefix}top_p must be in (0, 1] or null (got {top_p!r})")


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None) -> torch.Tensor:
    """One token per row from (B, vocab) logits. Greedy at temperature 0.

    top-k uses `topk` (no full sort); top-p sorts only when asked, and only the top-k survivors if both
    are given. `generator`: one for the batch, or a list of B (each row its own random stream).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    candidates = None  # token ids the (sorted) logits refer to, when filtered
    if top_k is not None and top_k < logits.size(-1):
        logits, candidates = torch.topk(logits, top_k, dim=-1)  # sorted, descending
    if top_p is not None and top_p < 1.0:
        if candidates is None:
            logits, candidates = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(logits, dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p; the first always stays.
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(drop, float("-inf"))
    try:
        probs = F.softmax(logits, dim=-1)
        if isinstance(generator, (list, tuple)):
            choice = torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g) for i, g in enumerate(generator)])
        else:
            choice = torch.multinomial(probs, 1, generator=generator)
        choice = choice.squeeze(-1)
    except RuntimeError as e:  # NaN/Inf logits: the weights themselves are broken
        if "probability tensor" not in str(e):
            raise
        raise GPTError("the model's next-token probabilities are NaN or Inf: its weights hold NaN/Inf, or values so "
                       "large that the logits overflow (a diverged run?); sample from another checkpoint, e.g. the "
                       "run's checkpoints/best") from None
    return choice if candidates is None else candidates.gather(-1, choice[:, None]).squeeze(-1)
