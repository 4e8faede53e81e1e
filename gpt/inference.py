"""A model ready for inference, shared by sample.py, the chat and the server: loaded from a model
directory, a .ckpt or an adapter on its base, put on its device in the sampling dtype, optionally int8.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from gpt.checkpoint import load_model
from gpt.devices import resolve_device, resolve_dtype
from gpt.errors import BadJSON, GPTError, parse_json
from gpt.model import GPT
from gpt.tokenizer import Tokenizer


def load_for_sampling(cfg) -> tuple[GPT, Tokenizer, torch.device]:
    device = resolve_device(cfg.device)
    if cfg.get("adapter"):  # a LoRA adapter on its base (the recorded one unless ckpt= says where it is)
        from gpt.adapter import load_adapter

        model, tokenizer, _ = load_adapter(cfg.adapter, cfg.get("ckpt"), map_location=device)
    else:
        if not cfg.get("ckpt"):
            raise GPTError(
                "say which model to sample from: ckpt=<exported model dir or .ckpt> (or adapter=<adapter dir>)"
            )
        model, tokenizer = load_model(cfg.ckpt, map_location=device)
    return prepare_for_sampling(model, device, cfg.dtype, cfg.get("quantize")), tokenizer, device


def prepare_for_sampling(model, device: torch.device, dtype: str = "auto", quantize: Optional[str] = None):
    """The model as sample.py runs it: in eval mode, on `device`, its weights stored in the sampling dtype (a
    token reads every weight once: not autocast, which would convert them again on every step; bf16 halves
    the bytes), optionally quantized (see quantize_weights)."""
    model = model.to(device, resolve_dtype(device, dtype)).eval()
    return quantize_weights(model, quantize) if quantize else model


def quantize_weights(model, how: str) -> GPT:
    """quantize=int8: every Linear's weight stored as int8 with one scale per output row (torchao's weight-only
    int8); activations stay in the sampling dtype. A batch-1 decode step reads every weight once per token, so
    it reads half the bytes of bf16: about 1.4x the tokens/s of bf16 with compile=true, where inductor calls its
    int8 x bf16 matmul kernel (README, Benchmark). Logits move by about 1% of their scale. An adapter is merged
    into the weights first; the token embedding (a lookup) keeps its dtype, so a tied LM head gets its own int8 copy.
    """
    if how != "int8":
        raise GPTError(f"quantize must be null or int8 (got {how!r})")
    from peft import PeftModel

    if isinstance(model, PeftModel):
        from gpt.adapter import merge

        model = merge(model)
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    try:
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, name: isinstance(module, torch.nn.Linear))
    except (RuntimeError, ValueError) as e:  # e.g. a model with n_embd=1: torchao's kernels need wider rows
        raise GPTError(
            f"quantize=int8 cannot quantize this model ({str(e).splitlines()[0][:120]}); sample it without quantize"
        ) from e
    return model


def load_any_model(path: str | Path, device: torch.device):
    """One of our model dirs / .ckpt files, or a Hugging Face GPT-2 or Llama directory converted in memory."""
    from gpt.checkpoint import CONFIG_FILE

    path = Path(path)
    config = path / CONFIG_FILE
    if path.is_dir() and config.is_file():
        try:
            hf = parse_json(config.read_bytes()).get("model_type") in ("gpt2", "llama")
        except BadJSON:
            hf = False  # load_model says what is wrong with it
        if hf:
            from gpt.convert import read_hf_dir

            model, tokenizer, _ = read_hf_dir(path)
            return model.to(device), tokenizer
    return load_model(path, map_location=device)
