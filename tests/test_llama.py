"""Llama's block as config choices (RoPE, RMSNorm, SwiGLU, grouped-query attention), Llama import/export
through transformers (random models made here, no downloads), and bits per byte."""

import json
import math
from dataclasses import replace

import pytest
import torch

from gpt.config import GPTConfig
from gpt.errors import GPTError
from gpt.generate import generate
from gpt.model import GPT

V = 61
VARIANTS = {
    "rope": dict(pos_emb="rope"),
    "rmsnorm": dict(norm="rmsnorm"),
    "swiglu": dict(mlp="swiglu"),
    "gqa": dict(n_kv_head=2),
    "mqa": dict(n_kv_head=1),
    "llama": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, rope_theta=500.0),
}


def small(**kw) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**dict(block_size=32, vocab_size=V, n_layer=2, n_head=4, n_embd=32), **kw})).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: make them count
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def set_impl(model: GPT, impl: str):
    for block in model.transformer.h:
        block.attn.use_sdpa = impl == "sdpa"


def padded_prompts(lengths):
    g = torch.Generator().manual_seed(2)
    T = max(lengths)
    idx = torch.randint(0, V, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, T - n :] = True
    return idx, mask


# -- every new option: math path = SDPA path, cache = no cache ---------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_math_path_equals_sdpa_path(variant):
    model = small(**VARIANTS[variant])
    x = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))
    idx, mask = padded_prompts([5, 11])
    outs = {}
    for impl in ("sdpa", "math"):
        set_impl(model, impl)
        cache = model.new_cache()
        pieces = [model(x[:, :9], cache=cache).logits]  # prefill
        pieces += [model(x[:, t : t + 1], cache=cache).logits for t in range(9, 12)]  # one token at a time
        pieces.append(model(x[:, 12:], cache=cache).logits)  # a chunk after a prefix (explicit mask)
        outs[impl] = (model(x).logits, torch.cat(pieces, 1), model(idx, attention_mask=mask).logits[mask])
    for a, b in zip(outs["sdpa"], outs["math"]):
        assert (a - b).abs().max().item() <= 1e-5, variant
    assert (outs["sdpa"][0] - outs["sdpa"][1]).abs().max().item() <= 1e-5  # cached = in one pass


@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_step_with_left_padding_equals_recompute(variant):
    """The fixed-shape step over the cache (n_kv_head heads; RoPE at each row's own positions) = the model on
    each row's real tokens alone."""
    model = small(**VARIANTS[variant])
    idx, mask = padded_prompts([3, 7, 5])
    cache = model.new_cache()
    model(idx, attention_mask=mask, cache=cache)
    assert cache.k[0].size(1) == model.config.kv_heads
    cache.start_decoding()
    rows = [idx[i][mask[i]] for i in range(3)]
    g = torch.Generator().manual_seed(3)
    for t in range(4):
        nxt = torch.randint(0, V, (3,), generator=g)
        logits = model.decode_step(nxt[:, None], cache)
        cache.length += 1
        for i in range(3):
            rows[i] = torch.cat([rows[i], nxt[i : i + 1]])
            assert (logits[i] - model(rows[i][None]).logits[0, -1]).abs().max().item() <= 1e-5, (t, i)


def test_rope_generation_slides_exactly():
    """Past the context, generation re-reads the last 3/4 from position 0: what the model predicts from that window."""
    model = small(block_size=16, **VARIANTS["llama"])
    prompt = torch.randint(0, V, (1, 10), generator=torch.Generator().manual_seed(4))
    out = generate(model, prompt, 30, temperature=0)
    full = torch.cat([prompt, out], 1)
    assert int(model(full[:, 17 - 12 : 17]).logits[0, -1].argmax()) == int(full[0, 17])


def test_rope_scores_depend_on_the_offset_only():
    from gpt.model import apply_rope, rope_angles

    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)  # (B, T, heads, head_dim)

    def score(m, n):
        cq, sq = rope_angles(torch.tensor([m]), 8, 100.0)
        ck, sk = rope_angles(torch.tensor([n]), 8, 100.0)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()

    assert score(7, 3) == pytest.approx(score(24, 20), abs=1e-5)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(n_head=4, n_kv_head=3), "multiple of n_kv_head"),
        (dict(pos_emb="alibi"), "pos_emb"),
        (dict(norm="batchnorm"), "norm"),
        (dict(mlp="relu"), "mlp"),
        (dict(n_embd=12, n_head=4, pos_emb="rope"), "even head size"),
        (dict(norm_eps=0), "norm_eps"),
        (dict(layer_norm_eps=1e-6, norm_eps=1e-3), "disagree"),
    ],
)
def test_impossible_choices_are_refused(kw, needle):
    with pytest.raises(GPTError, match=needle):
        GPTConfig(**{**dict(n_embd=32, n_head=4), **kw})


def test_layer_norm_eps_is_norm_eps_old_name_and_old_configs_load():
    assert GPTConfig(layer_norm_eps=1e-6).norm_eps == GPTConfig(norm_eps=1e-6).layer_norm_eps == 1e-6
    assert replace(GPTConfig(layer_norm_eps=1e-6), n_layer=2).norm_eps == 1e-6
    old = {
        k: v
        for k, v in GPTConfig(vocab_size=10).to_dict().items()
        if k not in ("n_kv_head", "pos_emb", "rope_theta", "norm", "norm_eps", "mlp", "mlp_hidden")
    }
    old["layer_norm_eps"] = 1e-6  # a config.json written before the architecture choices
    assert GPTConfig.from_dict(old) == GPTConfig(vocab_size=10, norm_eps=1e-6)
    new = GPTConfig(vocab_size=10, norm="rmsnorm").to_dict()
    del new["norm"]  # a file of today without a field that changes the math: refused, not defaulted
    with pytest.raises(GPTError, match=r"lacks \['norm'\]"):
        GPTConfig.from_dict(new)


# -- Llama interop: random transformers models (2 layers, 8 heads, 2 key/value heads) -------------------

TEXT = (
    "It is the east, and Juliet is the sun. Arise, fair sun, and kill the envious moon,\n"
    "Who is already sick and pale with grief. Ünïcödé — 日本語, tabs\tand  double  spaces.\n"
)
TOL = 1e-4  # fp32


@pytest.fixture(scope="module")
def bpe():
    from gpt.tokenizer import Tokenizer

    return Tokenizer.train_bpe(iter([[TEXT] * 4]), vocab_size=300, show_progress=False)


def llama_dir(path, bpe, tied: bool, **kw):
    """A random transformers LlamaForCausalLM saved with its tokenizer; returns (model, path)."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from gpt.tokenizer import EOS

    torch.manual_seed(0)
    cfg = LlamaConfig(
        **{
            **dict(
                vocab_size=320,
                hidden_size=64,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=8,
                num_key_value_heads=2,
                max_position_embeddings=48,
                rope_theta=1000.0,
                rms_norm_eps=1e-6,
                tie_word_embeddings=tied,
                bos_token_id=bpe.eos_id,
                eos_token_id=bpe.eos_id,
            ),
            **kw,
        }
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # RMSNorm gains start at 1: random ones would catch a swapped norm
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.generation_config.eos_token_id = None  # generation comparisons run to max_new_tokens
    model.save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=bpe.hf, eos_token=EOS, bos_token=EOS).save_pretrained(path)
    return model, path


@pytest.mark.parametrize("tied", [False, True])
def test_llama_import_export_round_trip(tmp_path, bpe, tied):
    from transformers import AutoModelForCausalLM

    from gpt.checkpoint import load_model
    from gpt.convert import export_hf, import_hf

    hf, src = llama_dir(tmp_path / "hf", bpe, tied)
    out, _ = import_hf(src, tmp_path / "ours")
    ours, tok = load_model(out)
    ours.eval()
    c = ours.config
    assert (
        c.pos_emb,
        c.norm,
        c.mlp,
        c.n_head,
        c.kv_heads,
        c.hidden_dim,
        c.bias,
        c.tie_embeddings,
        c.rope_theta,
        c.norm_eps,
        c.block_size,
    ) == ("rope", "rmsnorm", "swiglu", 8, 2, 96, False, tied, 1000.0, 1e-6, 48)
    x = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(x).logits
        assert (ours(x).logits - want).abs().max().item() <= TOL
        cache = ours.new_cache()  # the same logits through our KV cache, in pieces
        got = torch.cat(
            [ours(x[:, :17], cache=cache).logits] + [ours(x[:, t : t + 1], cache=cache).logits for t in range(17, 40)],
            1,
        )
        assert (got - want).abs().max().item() <= TOL
        # greedy generation: token for token what transformers' generate does
        prompt = x[:1, :6]
        theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(prompt))
        assert torch.equal(generate(ours, prompt, 20, temperature=0), theirs[:, 6:])
        # exported back: the same weights, the same logits in transformers, with no custom code
        back = AutoModelForCausalLM.from_pretrained(export_hf(out, tmp_path / "back")).eval()
        assert type(back).__name__ == "LlamaForCausalLM"
        assert torch.equal(back(x).logits, want)
    assert tok.encode(TEXT) == bpe.encode(TEXT)


def test_an_untied_llama_with_biases_and_multi_query_attention(tmp_path, bpe):
    from gpt.convert import import_hf

    hf, src = llama_dir(tmp_path / "hf", bpe, False, num_key_value_heads=1, attention_bias=True, mlp_bias=True)
    _, ours = import_hf(src, tmp_path / "ours")
    assert (ours.config.bias, ours.config.kv_heads) == (True, 1)
    x = torch.randint(0, 320, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours.eval()(x).logits - hf(x).logits).abs().max().item() <= TOL


@pytest.mark.parametrize(
    "edit, needle",
    [
        (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
        (dict(attention_bias=True, mlp_bias=False), "attention_bias"),
        (dict(head_dim=16), "head_dim"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(architectures=["LlamaForSequenceClassification"]), "architectures"),
    ],
)
def test_llama_configs_we_cannot_compute_are_refused_by_name(edit, needle):
    from gpt.convert import config_from_hf

    raw = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
    )
    config_from_hf(raw, "config.json")  # as is: fine
    with pytest.raises(GPTError, match=needle):
        config_from_hf({**raw, **edit}, "config.json")


def test_a_mixed_block_is_not_exported(tmp_path, bpe):
    from gpt.checkpoint import save_model_dir
    from gpt.convert import export_hf

    model = small(pos_emb="rope", vocab_size=320)  # RoPE with LayerNorm and GELU: neither GPT-2 nor Llama
    with pytest.raises(GPTError, match="neither GPT-2's block .* nor Llama's"):
        export_hf(save_model_dir(model, bpe, tmp_path / "ours"), tmp_path / "hf")


def test_lora_targets_reach_the_llama_block():
    from gpt.adapter import add_lora, lora_config, merge

    model = small(**VARIANTS["llama"])
    x = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    before = model(x).logits
    peft = add_lora(model, lora_config(rank=2, dropout=0.0, targets=["qkv", "attn_out", "mlp"])).eval()
    wrapped = {
        n.split(".h.0.")[-1].split(".lora_A")[0] for n, _ in peft.named_parameters() if ".h.0." in n and "lora_A" in n
    }
    assert wrapped == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}  # q/k/v, output, gate/up, down
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        adapted = peft(x).logits
        merged = merge(peft)(x).logits
    assert (adapted - before).abs().max().item() > 1e-3
    assert (merged - adapted).abs().max().item() <= 1e-5


# -- bits per byte ------------------------------------------------------------------------------------


def test_byte_lengths_add_up_to_the_text_bytes(bpe):
    from gpt.tokenizer import Tokenizer

    table = bpe.byte_lengths()
    assert table[bpe.eos_id] == 0  # a special token stands for no text
    assert sum(table[i] for i in bpe.encode(TEXT)) == len(TEXT.encode("utf-8"))  # multi-byte characters split
    chars = Tokenizer.char_level(TEXT)
    assert sum(chars.byte_lengths()[i] for i in chars.encode(TEXT)) == len(TEXT.encode("utf-8"))


def test_bpb_of_a_char_model_on_ascii_is_its_loss_in_bits():
    from gpt.scoring import bits_per_byte
    from gpt.tokenizer import Tokenizer

    text = "to be or not to be, that is the question\n" * 3  # 123 ASCII characters: one byte per token
    tok = Tokenizer.char_level(text)
    model = small(vocab_size=tok.vocab_size, block_size=200, **VARIANTS["llama"])
    ids = torch.tensor([[tok.eos_id] + tok.encode(text)])
    loss = model(ids[:, :-1], ids[:, 1:]).loss.item()  # every character predicted once, the first after EOS
    r = bits_per_byte(model, tok, text)
    assert (r["tokens"], r["bytes"]) == (123, 123)
    assert r["bpb"] == pytest.approx(loss / math.log(2), rel=1e-5)
    # windows of a shorter context, each token still scored once
    model.config.block_size = 32
    for stride in (32, 10):
        r = bits_per_byte(model, tok, text, stride=stride, batch_size=3)
        assert (r["tokens"], r["bytes"]) == (123, 123)
        assert r["bpb"] == pytest.approx(r["loss"] / math.log(2), rel=1e-6)


def test_bpb_of_a_bpe_model_and_in_validation(bpe):
    import lightning as L

    from gpt.lit import LanguageModel
    from gpt.scoring import bits_per_byte

    model = small(vocab_size=320, block_size=128, **VARIANTS["llama"])
    ids = torch.tensor([[bpe.eos_id] + bpe.encode(TEXT)])
    n_tokens, n_bytes = ids.size(1) - 1, len(TEXT.encode("utf-8"))
    assert n_bytes / n_tokens > 1.5  # merges: several bytes per token
    loss = model(ids[:, :-1], ids[:, 1:]).loss.item()
    r = bits_per_byte(model, bpe, TEXT)
    assert (r["tokens"], r["bytes"]) == (n_tokens, n_bytes)
    assert r["bpb"] == pytest.approx(loss * n_tokens / n_bytes / math.log(2), rel=1e-5)
    # every validation reports val/bpb beside val/loss: the same number for the same tokens
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader([batch], batch_size=None)  # the one batch as it is
    metrics = trainer.validate(LanguageModel(model, bpe), dataloaders=loader, verbose=False)[0]
    assert metrics["val/loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["val/bpb"] == pytest.approx(r["bpb"], rel=1e-5)


def test_evaluate_bpb_command_scores_ours_and_hugging_face_dirs_alike(tmp_path, bpe, capsys):
    from gpt.convert import import_hf
    from gpt.evaluate import main

    _, src = llama_dir(tmp_path / "hf", bpe, True)
    ours, _ = import_hf(src, tmp_path / "ours")
    (tmp_path / "t.txt").write_text(TEXT * 3)
    results = []
    for model in (ours, src):
        main(["bpb", str(model), str(tmp_path / "t.txt"), "--json", "--stride", "24"])
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["bpb"] == pytest.approx(results[1]["bpb"], rel=1e-5)
    assert results[0]["bytes"] == len((TEXT * 3).encode("utf-8"))
    with pytest.raises(SystemExit):
        main(["bpb", str(ours), str(tmp_path / "t.txt"), "--stride", "100"])  # longer than the context
    assert "stride must be between 1 and the model's context (48)" in capsys.readouterr().err


def test_attention_map_has_every_query_head_of_a_grouped_model():
    from gpt.viz import attention_weights

    model = small(**VARIANTS["llama"])
    weights = attention_weights(model, list(range(10)))
    assert weights[0].shape == (4, 10, 10)  # n_head maps, though 2 key/value heads
    assert torch.allclose(weights[0].sum(-1), torch.ones(4, 10), atol=1e-5)
    assert weights[0].triu(diagonal=1).abs().max().item() == 0.0
    assert not torch.allclose(weights[0][0], weights[0][1])  # heads of one group see the same keys, not the same map


def test_presets_have_their_parameter_counts():
    from conftest import preset

    with torch.device("meta"):
        assert GPT(preset("smollm2-135m")).num_params(non_embedding=False) == 134_515_008  # SmolLM2-135M's own count
        mini = GPT(replace(preset("mini"), vocab_size=65, bias=False))
        llama = GPT(replace(preset("llama_mini"), vocab_size=65))
    # the CPU recipe's GPT-2 block and its Llama counterpart: the same weights but GPT-2's 64 x 128 position embeddings
    assert llama.num_params() == mini.num_params() == llama.num_params(non_embedding=False) == 795_904
    assert mini.num_params(non_embedding=False) == 795_904 + 64 * 128


@pytest.mark.parametrize("variant", ["gpt2", "llama", "llama_untied"])
def test_the_memory_check_counts_the_parameters_the_model_has(variant):
    from gpt.memory import check_fits_in_memory, count_parameters

    kw = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2) if variant != "gpt2" else {}
    config = GPTConfig(
        block_size=32, vocab_size=50, n_layer=3, n_head=4, n_embd=32, tie_embeddings=variant != "llama_untied", **kw
    )
    assert count_parameters(config) == sum(p.numel() for p in GPT(config).parameters())
    huge = GPTConfig(block_size=32, vocab_size=50, n_layer=10**12, n_head=4, n_embd=32)
    with pytest.raises(GPTError, match="parameters need"):  # counted, not built: at once, in no memory
        check_fits_in_memory(huge)  # (where a config comes in; GPT itself trusts its config)


# -- what an import refuses, and options that would mean something else ----------------------------------


def _cli_error(main, argv, capsys) -> str:
    capsys.readouterr()  # (what building the fixture printed)
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "key, value, bound",
    [
        ("max_position_embeddings", 10**12, True),  # RoPE: no weights, but a KV cache of that length
        ("vocab_size", 10**13, True),
        ("num_hidden_layers", 10**10, True),
        ("intermediate_size", 10**13, False),
    ],
)
def test_llama_sizes_no_machine_can_hold_are_refused_naming_the_key(tmp_path, bpe, capsys, key, value, bound):
    from gpt.convert import main

    _, src = llama_dir(tmp_path / "hf", bpe, True)
    raw = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**raw, key: value}))
    err = _cli_error(main, ["import-hf", src, tmp_path / "out"], capsys)
    assert err.startswith(f"error: {src / 'config.json'}: {key}={value} makes the model need"), err
    assert f"lower {key} in config.json" in err and ("at most" in err) == bound
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int32, torch.bool])
def test_llama_integer_weights_are_refused_not_cast(tmp_path, bpe, capsys, dtype):
    from safetensors.torch import load_file, save_file

    from gpt.convert import main

    _, src = llama_dir(tmp_path / "hf", bpe, True)
    state = load_file(str(src / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    state[name] = (state[name] * 100).to(dtype)
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    err = _cli_error(main, ["import-hf", src, tmp_path / "out"], capsys)
    assert f"tensor {name!r} is {str(dtype).removeprefix('torch.')}: integer or quantized weights" in err, err
    assert not (tmp_path / "out").exists()


def test_a_quantized_llama_config_is_refused(tmp_path, bpe, capsys):
    from gpt.convert import main

    _, src = llama_dir(tmp_path / "hf", bpe, True)
    raw = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**raw, "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    err = _cli_error(main, ["import-hf", src, tmp_path / "out"], capsys)
    assert "has a quantization_config (quant_method 'gptq'): quantized checkpoints are not supported" in err


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--stride", "0"], "--stride must be a positive number of tokens (the window step; leave it out"),
        (["--stride", "-24"], "--stride must be a positive number of tokens"),
        (["--batch-size", "0"], "--batch-size must be a positive number of windows per forward pass (got 0)"),
        (["--limit", "0"], "--limit must be a positive number of characters"),
        (["--limit", "-5"], "--limit must be a positive number of characters (leave it out"),
        (["--device", ""], "--device must be auto, cpu, cuda, cuda:N or mps (got '')"),
        (["--device", "cuda:x"], "--device must be auto, cpu, cuda, cuda:N or mps (got 'cuda:x')"),
        (["--dtype", ""], "--dtype must be auto, float32, bfloat16 or float16 (got '')"),
    ],
)
def test_evaluate_options_that_would_mean_something_else_are_refused(tmp_path, bpe, capsys, extra, needle):
    from gpt.checkpoint import save_model_dir
    from gpt.evaluate import main

    model = save_model_dir(small(vocab_size=320), bpe, tmp_path / "m")
    (tmp_path / "t.txt").write_text(TEXT)
    err = _cli_error(main, ["bpb", model, tmp_path / "t.txt", *extra], capsys)
    assert needle in err, err


def test_evaluate_refuses_stride_zero_through_the_real_command_and_the_function(tmp_path, bpe):
    from conftest import run_cli

    from gpt.checkpoint import save_model_dir
    from gpt.scoring import bits_per_byte

    model = small(vocab_size=320)
    (tmp_path / "t.txt").write_text(TEXT)
    proc = run_cli(
        "-m gpt.evaluate",
        "bpb",
        str(save_model_dir(model, bpe, tmp_path / "m")),
        str(tmp_path / "t.txt"),
        "--stride",
        "0",
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        "error: --stride must be a positive number of tokens (the window step; leave it out for a whole "
        "context) (got 0)\n"
    )
    with pytest.raises(GPTError, match=r"stride must be between 1 and the model's context \(32\) \(got 0\)"):
        bits_per_byte(model, bpe, TEXT, stride=0)  # 0 is not "the default" here either
    assert bits_per_byte(model, bpe, TEXT)["stride"] == 32  # left out: the whole context
    for argv, needle in (
        (["bpb", "", str(tmp_path / "t.txt")], "the model argument is empty"),
        (["bpb", str(tmp_path / "m"), ""], "the text argument is empty"),
    ):
        proc = run_cli("-m gpt.evaluate", *argv)
        assert proc.returncode == 2 and proc.stderr.startswith(f"error: {needle}") and proc.stderr.count("\n") == 1


def test_bpb_of_a_missing_text_file_is_one_error_line(tmp_path, capsys):
    from gpt.evaluate import main

    with pytest.raises(SystemExit) as e:
        main(["bpb", str(tmp_path / "model"), str(tmp_path / "missing.txt")])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing.txt'} does not exist; give a UTF-8 text file\n"
