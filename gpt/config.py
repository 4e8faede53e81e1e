"""GPTConfig: the shape and architecture choices of a model, checked when made (a hand-edited config.json is
one clear error, not a traceback), with GPT-2's values as defaults. The named presets are
configs/model/*.yaml; gpt/model.py builds the model from it.
"""

from __future__ import annotations

import math
from dataclasses import InitVar, asdict, dataclass, fields
from typing import Optional

import torch.nn.functional as F

from gpt.errors import GPTError, is_int, is_number, json_type, unknown_keys

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
ADDED_FIELDS = {
    "n_kv_head": None,
    "pos_emb": "learned",
    "rope_theta": 10000.0,
    "norm": "layernorm",
    "mlp": "gelu",
    "mlp_hidden": None,
}


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
    # "sdpa": the fused kernel wherever it is the faster one; one-query decode steps and CPU bf16 training under
    # 512 positions take the explicit path (2-5x faster there, measured). "math": always the explicit path.
    attn_impl: str = "sdpa"
    tie_embeddings: bool = True  # lm_head shares wte's matrix; False after merging a LoRA adapter on lm_head
    layer_norm_eps: InitVar[Optional[float]] = None  # the old name of norm_eps (Python code, old config.json files)

    def __post_init__(self, layer_norm_eps):
        """Every field's type and range, so a hand-edited config.json (a string, null, NaN, a list) is one
        clear error before anything is built from it."""
        problems = []
        if layer_norm_eps is not None:
            if self.norm_eps not in (1e-5, layer_norm_eps):  # 1e-5: norm_eps left at its default
                problems.append(
                    f"layer_norm_eps={layer_norm_eps} and norm_eps={self.norm_eps} disagree; give "
                    "norm_eps only (layer_norm_eps is its old name)"
                )
            self.norm_eps = layer_norm_eps
        for name in ("block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                problems.append(f"{name} must be a positive integer (got {value!r})")
        for name in ("vocab_size", "n_kv_head", "mlp_hidden"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value <= 0):
                problems.append(f"{name} must be a positive integer or null (got {value!r})")
        if not problems and self.n_embd % self.n_head != 0:
            problems.append(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"e.g. n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}"
            )
        if not problems and self.n_head % self.kv_heads != 0:
            problems.append(
                f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head}): each "
                "key/value head serves an equal group of query heads"
            )
        if not problems and self.pos_emb == "rope" and self.head_dim % 2:
            problems.append(f"pos_emb=rope needs an even head size (n_embd / n_head = {self.head_dim})")
        if not (is_number(self.dropout) and 0.0 <= self.dropout < 1.0):  # NaN fails both comparisons
            problems.append(f"dropout must be a number in [0, 1) (got {self.dropout!r})")
        if not (is_number(self.norm_eps) and 0 < self.norm_eps < math.inf):
            problems.append(f"norm_eps must be a finite number > 0 (got {self.norm_eps!r})")
        if not (is_number(self.rope_theta) and 1 < self.rope_theta < math.inf):
            problems.append(f"rope_theta must be a finite number > 1 (got {self.rope_theta!r})")
        for name in ("bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false (got {getattr(self, name)!r})")
        for name, choices in (
            ("pos_emb", POS_EMBS),
            ("norm", NORMS),
            ("mlp", MLPS),
            ("attn_impl", ATTENTION_IMPLS),
            ("activation", tuple(ACTIVATIONS)),
        ):
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in choices:
                problems.append(f"{name} must be one of {list(choices)} (got {getattr(self, name)!r})")
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
        if not isinstance(d, dict):
            raise GPTError(f"{source} is {json_type(d)}, not a model config (an object); re-export the model")
        d = cls.upgrade_dict(d)
        known = [f.name for f in fields(cls)]
        unknown_keys(
            d,
            [*known, "model_type"],
            source,
            "fix its name, or re-export the model (configs/model/*.yaml list the settings)",
        )
        missing = sorted(set(known) - set(d) - {"attn_impl", "dropout"})  # those two do not change a trained model
        if missing or d.get("vocab_size") is None:
            raise GPTError(
                f"{source} lacks {missing or ['vocab_size']}; it was not written by this tool or was "
                "edited: re-export the model (a Hugging Face GPT-2 or Llama comes in through "
                "python -m gpt.convert import-hf)"
            )
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        # `model_type` lets PEFT (which reads `model.config`) treat us as a custom model.
        return {"model_type": "gpt", **asdict(self)}


# The old name reads as well as it writes (the InitVar takes it in the constructor; this replaces its class default).
GPTConfig.layer_norm_eps = property(lambda self: self.norm_eps, doc="the old name of norm_eps")
