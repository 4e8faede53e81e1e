"""A GPT language model, written from the math.

Read top to bottom (the config, GPTConfig, is gpt/config.py): rotary position embeddings, causal
self-attention (an explicit math path and the fused `scaled_dot_product_attention` path over the same
weights), the two MLPs, a pre-norm block, the KV cache, and the model. Pure PyTorch: no Lightning, no
Hydra, no transformers. The named shapes (presets) are `configs/model/*.yaml`; decoding (sampling, beam
search, the generation loop) is gpt/generate.py.

GPT-2's architecture is the default. Each of Llama's changes is a config choice of its own: rotary instead
of learned position embeddings (`pos_emb`), RMSNorm instead of LayerNorm (`norm`), the SiLU-gated MLP
(`mlp`), fewer key/value heads than query heads (`n_kv_head`), no biases (`bias`), an untied output layer
(`tie_embeddings`). Parameter names follow GPT-2 (`transformer.h.0.attn.c_attn.weight`, ...) so released
GPT-2 checkpoints map onto them with a transpose, and Llama's with a concatenation (see `gpt/convert.py`).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.config import ACTIVATIONS, GPTConfig
from gpt.errors import GPTError

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
        # On CPUs the fused kernel's bf16 version is several times slower than the explicit product for one
        # query (a decode step), and so is its bf16 backward pass for training-sized blocks (2-5x at
        # T = 64..256; it wins from T ~ 512 on). In fp32 it is the faster one for an eager decode step (26 vs
        # 52 us at 150 cached positions). A compiled decode step keeps the explicit product: inductor's
        # fused CPU attention for it gave wrong tokens under AVX2 kernels (torch 2.13), and was no faster.
        cpu_bf16 = q.device.type == "cpu" and q.dtype == torch.bfloat16
        slow_fused = (cpu_bf16 and torch.is_grad_enabled() and T < 512) or (
            T == 1 and (cpu_bf16 or torch.compiler.is_compiling())
        )
        if need_weights or not self.use_sdpa or slow_fused:
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
                q,
                k,
                v,
                attn_mask=attn_mask,
                is_causal=is_causal,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.n_kv_head != self.n_head,
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
        self.padded = False  # whether any filled column is padding (set by start_decoding)

    def reset(self):
        self.length, self.valid, self.seen, self.slot, self.padded = 0, None, None, None, False

    def start_decoding(self) -> None:
        """Keep the state of one-token decoding in tensors (which columns hold real tokens, each row's count
        of real tokens, the next column), so that every decode step has the same shapes and reads no
        changing Python number: one compiled graph then serves every step (see GPT.decode_step)."""
        B, device = self.k[0].size(0), self.k[0].device
        if self.valid is None:  # no padding so far
            self.valid = torch.ones(B, self.max_len, dtype=torch.bool, device=device)
            self.seen = torch.full((B,), self.length, dtype=torch.long, device=device)
            self.padded = False
        else:  # one look per prompt (a sync on a GPU), not one per token
            self.padded = not bool(self.valid[:, : self.length].all())
        self.valid[:, self.length :] = False  # not written yet (a compiled decode_step attends over the whole buffer)
        self.slot = torch.tensor([self.length], device=device)

    def decode_columns(self) -> int:
        """The columns a decode step attends over: compiled, the whole buffer (shapes that never change make
        one graph for every step); eager, the filled ones and the new one only (the rest are masked anyway,
        and reading them took a third of an eager step at 150 of 512 columns filled)."""
        return self.max_len if torch.compiler.is_compiling() else self.length + 1

    def decode_mask(self) -> Optional[torch.Tensor]:
        """Which of those columns each row may see in a decode step, (B, 1, 1, S); None: all of them (eager,
        and no row has padding: attention then runs without a mask, its fastest path)."""
        if torch.compiler.is_compiling() or self.padded:
            return self.valid[:, None, None, : self.decode_columns()]
        return None

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
        if self.slot is not None:  # a decode step: one new column, attention over decode_columns() (masked)
            self.k[layer].index_copy_(2, self.slot, k.to(self.k[layer].dtype))
            self.v[layer].index_copy_(2, self.slot, v.to(self.v[layer].dtype))
            end = self.decode_columns()
            return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        if self.k[layer] is None or self.k[layer].dtype != k.dtype:  # allocated lazily: autocast decides dtype
            B, H, _, D = k.shape
            self.k[layer] = k.new_zeros(B, H, self.max_len, D)
            self.v[layer] = v.new_zeros(B, H, self.max_len, D)
        end = self.length + k.size(2)
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
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
        self.transformer = nn.ModuleDict(
            dict(
                **layers,
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=make_norm(config),
            )
        )
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

    def embed(self, idx: torch.Tensor, pos: torch.Tensor):
        """The input of the first block for tokens idx at positions pos, and RoPE's (cos, sin) (None without)."""
        x = self.transformer.wte(idx)
        if self.config.pos_emb == "rope":
            return x, rope_angles(pos, self.config.head_dim, self.config.rope_theta)
        return x + self.transformer.wpe(pos), None

    def new_cache(self) -> KVCache:
        return KVCache(self.config.n_layer, self.config.block_size)

    def forward(
        self,
        idx,
        targets=None,
        *,
        attention_mask=None,
        position_ids=None,
        cache: Optional[KVCache] = None,
        need_weights: bool = False,
        only_last: bool = False,
    ) -> GPTOutput:
        """idx: (B, T) token ids. targets: (B, T) ids to predict, -100 where no loss is wanted.

        attention_mask: (B, T), 1 for real tokens and 0 for (left) padding. With a cache, the new tokens
        are appended after the cached ones. Packed rows (several examples in one row, gpt.tasks) instead give
        a (B, 1, T, T) boolean mask (True = may attend: causal within an example) with their position_ids (B, T).
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
        if attention_mask is not None and attention_mask.dim() == 4:  # packed rows: the caller's mask and positions
            if cache is not None or position_ids is None:
                raise GPTError("a (B, 1, T, T) attention_mask comes with position_ids and without a cache")
            pos, attn_mask, is_causal = position_ids, attention_mask.bool(), False
        else:
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

        forward() with a cache does the same with shapes that grow by one every token. Here, compiled, they
        never change: the new keys/values go to column cache.slot, attention runs over the whole buffer under
        the mask of filled columns (cache.valid), and the bookkeeping (slot, valid, per-row positions
        cache.seen) moves in place in tensors. So torch.compile makes one graph for all steps, with no
        Python per layer (generate(compile=True)). Eager, attention reads the filled columns only (see
        KVCache.decode_columns). Call cache.start_decoding() first; the caller counts cache.length.
        """
        cache.valid.index_fill_(1, cache.slot, True)
        x, rope = self.embed(idx, cache.seen[:, None])
        mask = cache.decode_mask()  # each row's filled, real columns
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
            cache.valid[:, start : start + T] = new
            keys_valid, seen = cache.valid[:, : start + T], cache.seen
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
