"""GPT-2 interop: a Hugging Face GPT-2 imported here computes what transformers computes, and ours exported
to Hugging Face format computes in transformers what it computes here. Offline: tiny random models."""

import json
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import preset, run_cli
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from gpt.checkpoint import load_model, save_model_dir
from gpt.config import GPTConfig
from gpt.convert import config_from_hf, export_hf, hf_state_dict, import_hf, main
from gpt.errors import GPTError
from gpt.generate import generate
from gpt.model import GPT
from gpt.tokenizer import EOS, Tokenizer

TOL = 1e-5  # fp32
TEXT = (
    "It is the east, and Juliet is the sun. Arise, fair sun, and kill the envious moon,\n"
    "Who is already sick and pale with grief. Ünïcödé — 日本語, tabs\tand  double  spaces.\n"
)
PROBES = ["Juliet is the sun", " envious moon\n\nWho", "ünïcödé 日本 zebra", f"end{EOS}start", "  tabs\tx"]


def perturb(params, scale=0.05):
    """Random weights everywhere, biases and LayerNorms included (default inits would hide mapping bugs)."""
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * scale)


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train_bpe(iter([[TEXT] * 4]), vocab_size=300, show_progress=False)


@pytest.fixture(scope="module")
def hf_model(bpe):
    """A random transformers GPT-2: 2 layers, 4 heads, 64 dims, vocab 1000 (the tokenizer's 300 + padding)."""
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2,
        n_head=4,
        n_embd=64,
        vocab_size=1000,
        n_positions=64,
        bos_token_id=bpe.eos_id,
        eos_token_id=bpe.eos_id,
    )
    model = GPT2LMHeadModel(cfg).eval()
    perturb(model.parameters())
    model.generation_config.eos_token_id = None  # generation comparisons run to max_new_tokens
    return model


@pytest.fixture(scope="module")
def hf_dir(hf_model, bpe, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    hf_model.save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=bpe.hf, eos_token=EOS, bos_token=EOS).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ours") / "gpt2-tiny"
    import_hf(hf_dir, out)
    model, tok = load_model(out)  # what was written, not what is in memory
    return out, model.eval(), tok


def tokens(B, T, vocab=1000, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def left_padded(lengths, vocab, pad, seed=2):
    T = max(lengths)
    idx = torch.full((len(lengths), T), pad)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        idx[i, T - n :] = tokens(1, n, vocab, seed + i)[0]
        mask[i, T - n :] = 1
    return idx, mask


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


# -- import: logits, cache, padding, generation ---------------------------------------------------------


@pytest.mark.parametrize("attn_impl", ["sdpa", "math"])
def test_imported_logits_equal_transformers(imported, hf_model, attn_impl):
    _, model, _ = imported
    if attn_impl == "math":
        math_model = GPT(replace(model.config, attn_impl="math")).eval()
        math_model.load_state_dict(model.state_dict())
        model = math_model
    x = tokens(3, 40)
    with torch.no_grad():
        ours, theirs = model(x).logits, hf_model(x).logits
    assert theirs.abs().max() > 0.5  # non-trivial logits
    assert max_diff(ours, theirs) < TOL


def test_imported_logits_with_our_kv_cache_equal_transformers(imported, hf_model):
    _, model, _ = imported
    x = tokens(2, 30, seed=3)
    with torch.no_grad():
        theirs = hf_model(x).logits
        cache = model.new_cache()
        steps = [model(x[:, :12], cache=cache).logits]  # prefill, then one token at a time
        steps += [model(x[:, t : t + 1], cache=cache).logits for t in range(12, 30)]
    assert max_diff(torch.cat(steps, 1), theirs) < TOL


def test_left_padded_batch_equals_transformers_on_real_tokens(imported, hf_model, bpe):
    _, model, _ = imported
    idx, mask = left_padded([9, 25, 17], 1000, pad=bpe.eos_id)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # what transformers' generate passes with padding
    with torch.no_grad():
        ours = model(idx, attention_mask=mask).logits
        theirs = hf_model(idx, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool()
    assert max_diff(ours[real], theirs[real]) < TOL


@pytest.mark.parametrize("lengths", [[20], [6, 20, 13]])
def test_greedy_generation_is_token_identical_to_transformers_generate(imported, hf_model, bpe, lengths):
    _, model, _ = imported
    idx, mask = left_padded(lengths, 1000, pad=bpe.eos_id, seed=5)
    ours = generate(model, idx, 24, attention_mask=mask if len(lengths) > 1 else None, temperature=0)
    theirs = hf_model.generate(idx, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=bpe.eos_id)[
        :, idx.shape[1] :
    ]
    assert theirs.shape == (len(lengths), 24)
    assert torch.equal(ours, theirs)


def test_imported_directory_carries_config_and_tokenizer(imported, hf_dir, hf_model, bpe):
    out, model, tok = imported
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json", ".gpt-model"}
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (2, 4, 64, 64, 1000)
    assert (c.activation, c.layer_norm_eps, c.bias, c.dropout) == ("gelu_tanh", 1e-5, True, 0.1)
    assert tok.eos_id == bpe.eos_id == hf_model.config.eos_token_id
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    for text in PROBES:
        assert tok.encode(text) == hf_tok(text)["input_ids"], text
    assert json.loads((out / "config.json").read_text())["gpt"]["converted_from"]["format"] == "huggingface-gpt2"


def test_released_checkpoint_layout_imports(hf_model, hf_dir, bpe, tmp_path):
    """As the released GPT-2 files: GPT2Model names (no "transformer."), causal-mask buffers, pytorch_model.bin,
    and vocab.json + merges.txt instead of tokenizer.json."""
    src = tmp_path / "released"
    src.mkdir()
    shutil.copy(hf_dir / "config.json", src)
    state = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items()}
    for i in range(hf_model.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64, dtype=torch.uint8).tril()
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, src / "pytorch_model.bin")
    bpe.hf.model.save(str(src))  # vocab.json + merges.txt
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer", "eos_token": EOS}))

    out, _ = import_hf(src, tmp_path / "ours")
    model, tok = load_model(out)
    x = tokens(2, 33, seed=7)
    with torch.no_grad():
        assert max_diff(model.eval()(x).logits, hf_model(x).logits) < TOL
    hf_tok = AutoTokenizer.from_pretrained(src)
    for text in PROBES:
        assert tok.encode(text) == hf_tok(text)["input_ids"], text
    assert tok.eos_id == bpe.eos_id


@pytest.mark.parametrize(
    "fields",
    [
        dict(activation_function="gelu"),  # exact GELU
        dict(activation_function="gelu_pytorch_tanh"),  # GPT-2's tanh GELU, computed by torch
        dict(reorder_and_upcast_attn=True),  # only changes float precision (eager attention)
    ],
)
def test_config_variants_we_can_represent_import_exactly(hf_dir, tmp_path, fields):
    src = tmp_path / "variant"
    shutil.copytree(hf_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **fields}))
    theirs = AutoModelForCausalLM.from_pretrained(src, attn_implementation="eager").eval()
    out, _ = import_hf(src, tmp_path / "ours")
    model, _ = load_model(out)
    x = tokens(2, 25, seed=12)
    with torch.no_grad():
        assert max_diff(model.eval()(x).logits, theirs(x).logits) < TOL


def test_sharded_safetensors_import(hf_model, bpe, tmp_path):
    src = tmp_path / "sharded"
    hf_model.save_pretrained(src, max_shard_size="100KB")
    PreTrainedTokenizerFast(tokenizer_object=bpe.hf, eos_token=EOS).save_pretrained(src)
    assert (src / "model.safetensors.index.json").is_file()
    out, _ = import_hf(src, tmp_path / "ours")
    model, _ = load_model(out)
    x = tokens(1, 20, seed=8)
    with torch.no_grad():
        assert max_diff(model.eval()(x).logits, hf_model(x).logits) < TOL


# -- export ------------------------------------------------------------------------------------------


def random_gpt(tok, **kw) -> GPT:
    torch.manual_seed(1)
    cfg = dict(block_size=48, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_embd=32)
    cfg.update(kw)
    model = GPT(GPTConfig(**cfg))
    perturb(model.parameters())
    return model.eval()


@pytest.mark.parametrize(
    "kind, kw",
    [
        (
            "char",
            dict(bias=False, activation="gelu", vocab_size=64),
        ),  # nanoGPT-style: no biases, exact GELU, padded vocab
        ("bpe", dict(bias=True, activation="gelu_tanh")),  # GPT-2-style
    ],
)
def test_exported_model_loads_in_transformers_with_equal_logits(kind, kw, bpe, tmp_path):
    tok = Tokenizer.char_level(TEXT) if kind == "char" else bpe
    model = random_gpt(tok, **kw)
    src = save_model_dir(model, tok, tmp_path / "ours")
    out = export_hf(src, tmp_path / "hf")

    config = json.loads((out / "config.json").read_text())
    assert (
        config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"] and "auto_map" not in config
    )
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel" and hf.config.vocab_size == model.config.vocab_size
    x = tokens(3, 30, vocab=tok.vocab_size, seed=9)
    with torch.no_grad():
        assert max_diff(model(x).logits, hf(x).logits) < TOL
        idx, mask = left_padded([5, 12], tok.vocab_size, pad=tok.eos_id, seed=10)
        ours = generate(model, idx, 16, attention_mask=mask, temperature=0)
        theirs = hf.generate(
            idx, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=tok.eos_id
        )[:, idx.shape[1] :]
    assert torch.equal(ours, theirs)

    hf_tok = AutoTokenizer.from_pretrained(out)
    assert type(hf_tok).__name__ == ("GPT2Tokenizer" if kind == "bpe" else "TokenizersBackend")
    assert hf_tok.eos_token_id == tok.eos_id
    for text in PROBES:
        ids = hf_tok(text)["input_ids"]
        assert ids == tok.encode(text), text
        assert hf_tok.decode(ids) == tok.decode(ids, skip_special_tokens=False)


def test_import_then_export_gives_the_same_tensors(imported, hf_dir, tmp_path):
    out, _, _ = imported
    back = export_hf(out, tmp_path / "hf")
    original, again = load_file(str(hf_dir / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert original.keys() == again.keys()
    for k in original:
        assert torch.equal(original[k], again[k]), k
    a, b = json.loads((hf_dir / "config.json").read_text()), json.loads((back / "config.json").read_text())
    for field in (
        "n_layer",
        "n_head",
        "n_embd",
        "n_positions",
        "vocab_size",
        "activation_function",
        "layer_norm_epsilon",
        "eos_token_id",
        "tie_word_embeddings",
    ):
        assert a[field] == b[field], field


def test_export_then_import_gives_the_same_model(bpe, tmp_path):
    model = random_gpt(bpe)
    out, _ = import_hf(export_hf(save_model_dir(model, bpe, tmp_path / "ours"), tmp_path / "hf"), tmp_path / "back")
    again, tok = load_model(out)
    assert again.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    assert tok.to_str() == bpe.to_str()


def test_merged_lora_model_exports_the_same_way(bpe, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = random_gpt(bpe)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=False))
    x = tokens(2, 20, vocab=bpe.vocab_size, seed=11)
    with torch.no_grad():
        with_adapter = lora.eval()(x).logits
    merged = lora.merge_and_unload()
    out = export_hf(save_model_dir(merged, bpe, tmp_path / "merged"), tmp_path / "hf")
    with torch.no_grad():
        assert max_diff(AutoModelForCausalLM.from_pretrained(out).eval()(x).logits, with_adapter) < TOL


def test_gpt2_presets_have_the_released_checkpoint_shapes():
    """Our presets, mapped to GPT-2's names, have exactly the tensors of transformers' GPT-2 of that size."""
    published = {
        "gpt2": GPT2Config(),  # transformers' defaults are GPT-2 124M
        "gpt2-medium": GPT2Config(n_layer=24, n_head=16, n_embd=1024),
        "gpt2-large": GPT2Config(n_layer=36, n_head=20, n_embd=1280),
        "gpt2-xl": GPT2Config(n_layer=48, n_head=25, n_embd=1600),
    }
    for name, hf_cfg in published.items():
        config = preset(name)
        assert replace(config_from_hf(hf_cfg.to_dict(), name), dropout=config.dropout) == config, name
        with torch.device("meta"):
            ours, theirs = hf_state_dict(GPT(config)), GPT2LMHeadModel(hf_cfg).state_dict()
        theirs.pop("lm_head.weight")  # tied: not saved
        assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}, name


# -- refusals ----------------------------------------------------------------------------------------


def edit_config(**fields):
    def edit(path: Path):
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(fields)
        (path / "config.json").write_text(json.dumps(cfg))

    return edit


def edit_weights(fn):
    def edit(path: Path):
        state = load_file(str(path / "model.safetensors"))
        fn(state)
        save_file(state, str(path / "model.safetensors"))

    return edit


MISTRAL = {
    "model_type": "mistral",
    "architectures": ["MistralForCausalLM"],
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "vocab_size": 1000,
}


@pytest.mark.parametrize(
    "edit, needles",
    [
        (lambda p: (p / "config.json").write_text(json.dumps(MISTRAL)), ["model_type 'mistral'", "MistralForCausalLM"]),
        # a Llama config.json over GPT-2's weights: read as Llama, and the weights do not match it
        (
            lambda p: (p / "config.json").write_text(
                json.dumps({**MISTRAL, "model_type": "llama", "architectures": None})
            ),
            ["missing tensor 'lm_head.weight'", "does not match its config.json"],
        ),
        (edit_config(architectures=["GPT2ForSequenceClassification"]), ["GPT2ForSequenceClassification"]),
        (
            edit_weights(lambda s: s.pop("transformer.h.1.mlp.c_fc.weight")),
            ["missing", "transformer.h.1.mlp.c_fc.weight"],
        ),
        (
            edit_weights(lambda s: s.update({"transformer.h.0.attn.q_proj.weight": torch.zeros(64, 64)})),
            ["unexpected", "transformer.h.0.attn.q_proj.weight"],
        ),
        (
            edit_weights(lambda s: s.update({"transformer.wpe.weight": torch.zeros(32, 64)})),
            ["transformer.wpe.weight", "(32, 64)", "(64, 64)"],
        ),
        (
            edit_weights(lambda s: s.update({"lm_head.weight": torch.zeros(1000, 64)})),
            ["lm_head.weight", "tie_word_embeddings=true"],
        ),
        (edit_config(activation_function="relu"), ["activation_function 'relu'"]),
        (edit_config(scale_attn_by_inverse_layer_idx=True), ["scale_attn_by_inverse_layer_idx"]),
        (edit_config(add_cross_attention=True), ["add_cross_attention"]),
        (edit_config(tie_word_embeddings=False), ["lm_head.weight", "tie_word_embeddings=false"]),
        (edit_config(n_inner=100), ["n_inner"]),
        (edit_config(vocab_size=200), ["300 tokens", "200"]),
        (edit_config(eos_token_id=5), ["eos_token_id=5"]),
        (lambda p: (p / "tokenizer.json").unlink(), ["no tokenizer"]),
        (lambda p: (p / "model.safetensors").unlink(), ["no weights", "model.safetensors"]),
        (lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 64), ["model.safetensors", "corrupt"]),
    ],
)
def test_mismatches_are_refused_naming_the_key(hf_dir, tmp_path, edit, needles):
    src = tmp_path / "broken"
    shutil.copytree(hf_dir, src)
    edit(src)
    with pytest.raises(GPTError) as err:
        import_hf(src, tmp_path / "out")
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    assert not (tmp_path / "out").exists()  # nothing written, not even in part


def test_a_pytorch_bin_with_code_is_refused_not_run(hf_dir, tmp_path):
    src = tmp_path / "evil"
    shutil.copytree(hf_dir, src)
    (src / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (src / "pytorch_model.bin").write_bytes(pickle.dumps({"wte.weight": Payload()}, protocol=2))
    with pytest.raises(GPTError, match="cannot be loaded safely"):
        import_hf(src, tmp_path / "out")
    assert not marker.exists()


def test_export_refuses_a_lora_adapter_directory(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(GPTError, match="LoRA adapter"):
        export_hf(tmp_path / "adapter", tmp_path / "hf")


# -- command line ------------------------------------------------------------------------------------


def test_cli_import_then_sample(hf_dir, tmp_path):
    out = tmp_path / "ours"
    proc = run_cli("-m gpt.convert", "import-hf", str(hf_dir), str(out))
    assert proc.returncode == 0, proc.stderr
    assert "2 layers, 4 heads, 64 dims" in proc.stdout
    proc = run_cli(
        "sample.py", f"ckpt={out}", "prompt=Juliet", "max_new_tokens=8", "temperature=0", "device=cpu", "stream=false"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Juliet") and len(proc.stdout) > len("Juliet")


def test_cli_refuses_to_overwrite_without_force(hf_dir, imported, tmp_path, capsys, monkeypatch):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        main(["import-hf", str(hf_dir), str(out)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--force" in err and "Traceback" not in err
    assert (out / "notes.txt").read_text() == "mine"

    with pytest.raises(SystemExit):  # --force replaces a directory we wrote, never a folder of other things
        main(["export-hf", str(imported[0]), str(out), "--force"])
    assert "holds notes.txt: not a model directory this tool wrote; --force only" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    main(["export-hf", str(imported[0]), str(out)])
    (out / "model.safetensors").write_text("stale")
    main(["export-hf", str(imported[0]), str(out), "--force"])  # asked for, on a directory we wrote: replaced whole
    assert (out / "model.safetensors").read_bytes() != b"stale" and (out / "config.json").is_file()
    (out / "runs").mkdir()
    with pytest.raises(SystemExit):  # a subfolder we did not write (say runs/<name>/ with its runs): kept
        main(["export-hf", str(imported[0]), str(out), "--force"])
    assert "holds runs/: files this tool did not write" in capsys.readouterr().err and (out / "runs").is_dir()
    with pytest.raises(SystemExit):  # never the input itself, even with --force
        main(["export-hf", str(out), str(out), "--force"])
    assert "would replace the input" in capsys.readouterr().err
    monkeypatch.chdir(out / "runs")
    with pytest.raises(SystemExit):  # nor the directory the user is in, or one holding it
        main(["export-hf", str(imported[0]), ".", "--force"])
    assert "is the working directory or holds it" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["import-hf", "somewhere"], ["out_dir"]),  # argparse's own errors follow the one-line rule too
        (["convert-everything"], ["invalid choice"]),
        (["import-hf", "{tmp}/nowhere", "{tmp}/out"], ["nowhere", "not a Hugging Face model directory"]),
        (["export-hf", "{tmp}/nowhere", "{tmp}/out"], ["nowhere", "does not exist"]),
        # an empty path is the working directory to pathlib: never what an empty value meant
        (["export-hf", "{tmp}/nowhere", ""], ["the hf_dir argument is empty", "give a path"]),
        (["import-hf", "", "{tmp}/out"], ["the hf_dir argument is empty"]),
        (["import-hf", "{tmp}/nowhere", ""], ["the out_dir argument is empty"]),
        (["export-hf", "", "{tmp}/out"], ["the model argument is empty"]),
    ],
)
def test_cli_bad_input_is_one_error_line(argv, needles, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([a.format(tmp=tmp_path) for a in argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err  # one line, no usage block, no traceback
    for needle in needles:
        assert needle in err, err


# -- what an import refuses instead of computing something else ------------------------------------------


def _copy_with(hf_dir, dst, config_edit=None, state_edit=None):
    shutil.copytree(hf_dir, dst)
    if config_edit:
        raw = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**raw, **config_edit}))
    if state_edit:
        state = load_file(str(dst / "model.safetensors"))
        state_edit(state)
        save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _int8(state):
    w = state["transformer.h.0.attn.c_attn.weight"]
    state["transformer.h.0.attn.c_attn.weight"] = (w * 100).round().clamp(-128, 127).to(torch.int8)


@pytest.mark.parametrize(
    "config_edit, state_edit, needles",
    [
        (None, _int8, ["'transformer.h.0.attn.c_attn.weight' is int8", "integer or quantized weights"]),
        (
            None,
            lambda s: s.update({k: v.to(torch.uint8) for k, v in s.items() if k.endswith("ln_1.weight")}),
            ["'transformer.h.0.ln_1.weight' is uint8 (+1 more)"],
        ),
        (None, lambda s: s.update({"transformer.wpe.weight": s["transformer.wpe.weight"].to(torch.int32)}), ["int32"]),
        (None, lambda s: s.update({"transformer.ln_f.bias": s["transformer.ln_f.bias"] > 0}), ["is bool"]),
        (
            {"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}},
            None,
            ["quantization_config (quant_method 'bitsandbytes')", "unquantized"],
        ),
    ],
)
def test_integer_and_quantized_weights_are_refused_by_name(hf_dir, tmp_path, capsys, config_edit, state_edit, needles):
    src = _copy_with(hf_dir, tmp_path / "q", config_edit, state_edit)
    with pytest.raises(SystemExit) as exit_:
        main(["import-hf", str(src), str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "key, value, bound",
    [
        ("n_positions", 10**12, True),  # a position table (and a KV cache) no machine holds
        ("vocab_size", 10**13, True),
        ("n_layer", 10**10, True),
        ("n_embd", 2**22, False),  # grows the model with its square: no "at most" bound, the key is named
    ],
)
def test_sizes_no_machine_can_hold_are_refused_naming_the_key(hf_dir, tmp_path, capsys, key, value, bound):
    src = _copy_with(hf_dir, tmp_path / "big", {key: value})
    with pytest.raises(SystemExit) as exit_:
        main(["import-hf", str(src), str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {src / 'config.json'}: {key}={value} makes the model need")
    assert f"lower {key} in config.json" in err and "GiB of memory" in err
    assert ("at most" in err) == bound
    if key == "n_positions":  # the bound is a context that fits: importing with it is accepted by the check
        from gpt.config import GPTConfig as C
        from gpt.llama import import_bytes
        from gpt.memory import physical_memory

        most = int(err.split("at most ")[1].split(" fits")[0].replace(",", ""))
        assert most > 64
        fits = C(block_size=most, vocab_size=1000, n_layer=2, n_head=4, n_embd=64)
        assert import_bytes(fits) <= physical_memory() < import_bytes(replace(fits, block_size=most + 1))
    assert not (tmp_path / "out").exists()
