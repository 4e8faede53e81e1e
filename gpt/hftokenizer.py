"""Hugging Face tokenizer files <-> our Tokenizer: reading a downloaded model's tokenizer (tokenizer.json, or
GPT-2's vocab.json + merges.txt) and writing tokenizer.json + tokenizer_config.json so transformers loads ours.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from transformers import PreTrainedTokenizerFast

from gpt.checkpoint import CONFIG_FILE
from gpt.errors import GPTError
from gpt.errors import read_json as read_json_file
from gpt.tokenizer import EOS, TOKENIZER_FILE, UNK, Tokenizer


def read_json(path: Path, fix: str = "download it again") -> dict:
    """A downloaded model's JSON file (config.json, tokenizer_config.json, the weights index): an object, of sane
    depth, or one GPTError line (gpt.errors.read_json)."""
    return read_json_file(path, fix)


def tokenizer_from_hf(hf_dir: Path, raw: dict, vocab_size: int) -> Tokenizer:
    """tokenizer.json as it is, or GPT-2's vocab.json + merges.txt; `<|endoftext|>` must be there (our EOS)."""
    settings_file = hf_dir / "tokenizer_config.json"
    settings = read_json(settings_file) if settings_file.is_file() else {}
    if not isinstance(settings.get("add_prefix_space", False), bool):
        raise GPTError(
            f"{settings_file}: add_prefix_space must be true or false (got {settings['add_prefix_space']!r:.40}); "
            "download it again"
        )
    if (hf_dir / TOKENIZER_FILE).is_file():
        tokenizer = Tokenizer.load(hf_dir)
    elif (hf_dir / "vocab.json").is_file() and (hf_dir / "merges.txt").is_file():
        tokenizer = Tokenizer.from_gpt2_files(
            hf_dir / "vocab.json", hf_dir / "merges.txt", add_prefix_space=settings.get("add_prefix_space", False)
        )
    else:
        raise GPTError(
            f"{hf_dir} has no tokenizer: expected {TOKENIZER_FILE}, or vocab.json + merges.txt "
            "(download them together with the weights)"
        )
    # A tokenizer.json may carry a truncation or padding setting; ours never truncate or pad silently.
    tokenizer.hf.no_truncation()
    tokenizer.hf.no_padding()
    if tokenizer.eos_id is None:
        raise GPTError(
            f"{hf_dir}: the tokenizer has no {EOS} token (GPT-2's end of text, and ours); a tokenizer "
            "that ends texts with another token (Llama 2's </s>, Llama 3's <|end_of_text|>) cannot be used"
        )
    eos = raw.get("eos_token_id")
    if eos is not None and tokenizer.eos_id not in (eos if isinstance(eos, list) else [eos]):
        raise GPTError(
            f"{hf_dir / CONFIG_FILE}: eos_token_id={eos} but the tokenizer's {EOS} is id {tokenizer.eos_id}; "
            "the tokenizer and the model do not belong together"
        )
    if tokenizer.vocab_size > vocab_size:
        raise GPTError(
            f"{hf_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab_size} "
            "(vocab_size in config.json); the tokenizer and the model do not belong together"
        )
    return tokenizer


def gpt2_add_prefix_space(tokenizer: Tokenizer) -> Optional[bool]:
    """add_prefix_space if `tokenizer` is exactly GPT-2's scheme (what transformers' GPT2Tokenizer rebuilds
    from a tokenizer.json: byte-level BPE, no normalizer, no other special tokens), else None."""
    spec = json.loads(tokenizer.to_str())
    model, pre, dec = spec.get("model") or {}, spec.get("pre_tokenizer") or {}, spec.get("decoder") or {}
    plain_bpe = model.get("type") == "BPE" and not any(
        model.get(k)
        for k in ("dropout", "byte_fallback", "continuing_subword_prefix", "end_of_word_suffix", "ignore_merges")
    )
    if (
        plain_bpe
        and spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and dec.get("type") == "ByteLevel"
        and {t["content"] for t in spec.get("added_tokens", [])} <= {EOS}
    ):
        return bool(pre.get("add_prefix_space", False))
    return None


def save_hf_tokenizer(tokenizer: Tokenizer, path: Path, model_max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json that `AutoTokenizer.from_pretrained` loads without custom code.

    A GPT-2-style byte-level BPE is declared a `GPT2Tokenizer` (what GPT-2's own directory says); any other
    tokenizer (e.g. char-level) a `PreTrainedTokenizerFast`, which takes tokenizer.json as it is.
    """
    prefix_space = gpt2_add_prefix_space(tokenizer)
    specials = {}
    if tokenizer.eos_id is not None:
        specials.update(eos_token=EOS, bos_token=EOS)  # GPT-2 uses <|endoftext|> for both
    if tokenizer.unk_id is not None:
        specials["unk_token"] = UNK
    elif prefix_space is not None and tokenizer.eos_id is not None:
        specials["unk_token"] = EOS  # as GPT-2's own tokenizer_config (byte-level BPE never needs it)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.hf, model_max_length=model_max_length, clean_up_tokenization_spaces=False, **specials
    )
    fast.save_pretrained(str(path))
    tokenizer.save(path / TOKENIZER_FILE)  # ours as it is (transformers adds a post-processor that does nothing)
    # transformers 5 writes its internal class name (TokenizersBackend), which earlier versions do not know.
    config_path = path / "tokenizer_config.json"
    settings = read_json(config_path, "this is a bug: transformers wrote it")
    if prefix_space is None:
        settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    else:
        settings.update(tokenizer_class="GPT2Tokenizer", add_prefix_space=prefix_space)
    config_path.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
