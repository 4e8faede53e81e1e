"""Exported model directories and .ckpt files: export = reload, and every broken file refused clearly."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from gpt.checkpoint import load_model, save_model_dir
from gpt.config import GPTConfig
from gpt.errors import GPTError
from gpt.model import GPT
from gpt.tokenizer import Tokenizer

TEXT = "It is the east, and Juliet is the sun.\n"


@pytest.fixture
def model_and_tok():
    torch.manual_seed(0)
    tok = Tokenizer.char_level(TEXT)
    model = GPT(GPTConfig(block_size=32, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=16, bias=False)).eval()
    return model, tok


def test_export_then_reload_gives_identical_logits(model_and_tok, tmp_path):
    model, tok = model_and_tok
    out = save_model_dir(model, tok, tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    again, tok2 = load_model(out)
    x = torch.tensor([tok.encode(TEXT[:30])])
    assert torch.equal(model(x).logits, again.eval()(x).logits)
    assert again.lm_head.weight is again.transformer.wte.weight  # tying survives the round trip
    assert tok2.encode(TEXT) == tok.encode(TEXT)
    assert json.loads((out / "config.json").read_text())["bias"] is False
    umask = os.umask(0)
    os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == dict.fromkeys(
        ["config.json", "model.safetensors", "tokenizer.json"], 0o666 & ~umask
    )  # no private (0600) weights


def test_export_replaces_an_existing_directory_whole(model_and_tok, tmp_path):
    model, tok = model_and_tok
    save_model_dir(model, tok, tmp_path / "m")
    (tmp_path / "m" / "stale.txt").write_text("from the previous export")
    with torch.no_grad():
        model.transformer.wpe.weight.add_(1.0)
    save_model_dir(model, tok, tmp_path / "m")
    assert not (tmp_path / "m" / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary directories left behind
    again, _ = load_model(tmp_path / "m")
    assert torch.equal(again.transformer.wpe.weight, model.transformer.wpe.weight)


def test_lightning_style_ckpt_loads_with_weights_only(model_and_tok, tmp_path):
    model, tok = model_and_tok
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "gpt": {"config": model.config.to_dict(), "tokenizer": tok.to_str()},
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    again, _ = load_model(tmp_path / "last.ckpt")
    x = torch.tensor([tok.encode(TEXT[:20])])
    assert torch.equal(model(x).logits, again.eval()(x).logits)


def test_a_pickle_that_runs_code_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    with pytest.raises(GPTError, match="cannot be loaded safely"):
        load_model(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_truncated_safetensors(model_and_tok, tmp_path):
    model, tok = model_and_tok
    out = save_model_dir(model, tok, tmp_path / "m")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(GPTError, match="truncated or corrupt"):
        load_model(out)


def test_truncated_ckpt(model_and_tok, tmp_path):
    model, tok = model_and_tok
    torch.save({"state_dict": model.state_dict()}, tmp_path / "x.ckpt")
    data = (tmp_path / "x.ckpt").read_bytes()
    (tmp_path / "x.ckpt").write_bytes(data[: len(data) // 3])
    with pytest.raises(GPTError, match="x.ckpt"):
        load_model(tmp_path / "x.ckpt")


def test_not_a_model_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(GPTError, match="not a model directory"):
        load_model(tmp_path)
    with pytest.raises(GPTError, match="does not exist"):
        load_model(tmp_path / "missing")


def test_weights_from_a_different_vocabulary(model_and_tok, tmp_path):
    model, tok = model_and_tok
    out = save_model_dir(model, tok, tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    cfg["vocab_size"] += 10
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GPTError, match="transformer.wte.weight"):
        load_model(out)


@pytest.mark.parametrize("key", ["activation", "n_embd", "bias", "tie_embeddings", "vocab_size"])
def test_a_config_missing_a_key_that_changes_the_math_is_refused(model_and_tok, tmp_path, key):
    """A default in its place would load the weights and compute something else (e.g. GELU's tanh form for
    a model trained with the exact one) or fail far from the cause."""
    model, tok = model_and_tok
    out = save_model_dir(model, tok, tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    del cfg[key]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GPTError, match=f"config.json lacks \\['{key}'\\]; .*re-export"):
        load_model(out)
    cfg.pop("attn_impl"), cfg.pop("dropout")  # run-time choices, not part of the trained function
    cfg[key] = model.config.to_dict()[key]
    (out / "config.json").write_text(json.dumps(cfg))
    assert torch.equal(load_model(out)[0].transformer.wte.weight, model.transformer.wte.weight)


def test_tokenizer_bigger_than_the_model(model_and_tok, tmp_path):
    model, tok = model_and_tok
    out = save_model_dir(model, tok, tmp_path / "m")
    Tokenizer.char_level(TEXT + "XYZQ").save(out)
    with pytest.raises(GPTError, match="tokenizer has"):
        load_model(out)


def test_missing_and_extra_tensors_are_named(model_and_tok, tmp_path):
    from safetensors.torch import load_file, save_file

    model, tok = model_and_tok
    out = save_model_dir(model, tok, tmp_path / "m")
    state = load_file(str(out / "model.safetensors"))
    state.pop("transformer.h.1.mlp.c_fc.weight")
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(GPTError, match="transformer.h.1.mlp.c_fc.weight"):
        load_model(out)
    state = load_file(str(save_model_dir(model, tok, tmp_path / "n") / "model.safetensors"))
    state["transformer.h.9.attn.c_attn.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "n" / "model.safetensors"))
    with pytest.raises(GPTError, match="transformer.h.9.attn.c_attn.weight"):
        load_model(tmp_path / "n")
