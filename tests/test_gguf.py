"""GGUF export (gpt/ggufexport.py), proven in llama.cpp itself.

The cheap tests read the file back with the `gguf` package's GGUFReader (metadata, tensors, the RoPE
permutation's math) and check the refusals. The `slow` ones load the exported files in llama.cpp through
llama-cpp-python (compiled from source by pip; CI installs it) and compare with our own model: greedy
tokens, logits and the tokenizer's ids. llama_cpp missing is a failure here, not a skip.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES, assert_user_error, run_cli
from gguf import GGMLQuantizationType, GGUFReader, quants
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from gpt.adapter import add_lora, base_record, lora_config, merge, save_adapter_dir
from gpt.checkpoint import load_model, save_model_dir
from gpt.config import GPTConfig
from gpt.errors import GPTError
from gpt.generate import generate
from gpt.ggufexport import export_gguf, rope_permute
from gpt.model import GPT, apply_rope, rope_angles
from gpt.tokenizer import EOS, Tokenizer

TEXT = (FIXTURES / "tinyshakespeare.txt").read_text()
VOCAB = 400  # the tokenizer's; the Llama-untied model pads its vocabulary to 416
LLAMA = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu")
SHAPES = {  # 2 layers, 4 heads, 64 dims, context 64
    "gpt2": dict(vocab_size=VOCAB),
    # GPT-2's block as trained here: without biases (zeros in the file), 2 key/value heads, a narrower MLP, untied
    "gpt2_variant": dict(vocab_size=VOCAB, bias=False, n_kv_head=2, mlp_hidden=160, tie_embeddings=False),
    "llama_tied": dict(vocab_size=VOCAB, n_kv_head=2, bias=False, rope_theta=10000.0, **LLAMA),
    "llama_untied": dict(vocab_size=416, n_kv_head=1, bias=True, tie_embeddings=False, rope_theta=50000.0, **LLAMA),
}
PROMPTS = ["We are accounted poor", "What authority surfeits", "Consider you what"]  # from the text trained on
# 20 strings that a byte-level BPE must split exactly as GPT-2's regex does
AWKWARD = [
    "Hello, world!",
    "  two leading spaces",
    "trailing spaces   ",
    "runs   of    spaces     between",
    "\n\nnewlines\n\n\nand more\n",
    "\ttabs\tand\t\tmore tabs\t",
    "mixed \t \n whitespace \r\n windows\r\n",
    "digits 0 12 345 6789 1234567890 3.14159 1,000,000",
    "emoji 🚀🦙 😶\u200d🌫️ 👍🏽 ✅",
    "Ünïcödé àéîõü ßÆØÅ e\u0301",
    "日本語のテキスト and 中文 mixed",
    "Русский текст и English words",
    "العربية مع أرقام ١٢٣",
    "हिन्दी देवनागरी 한국어",
    "ROMEO:\nBut soft, what light through yonder window breaks?",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "----====!!!!????....''''```\"\"\"",
    "zero\u200bwidth\u00a0nbsp\u3000ideographic space",
    " ",
    "a",
]


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train_bpe(iter([TEXT.splitlines()]), vocab_size=VOCAB, show_progress=False)


def tiny(kind: str, **overrides) -> GPTConfig:
    return GPTConfig(**{**dict(block_size=64, n_layer=2, n_head=4, n_embd=64), **SHAPES[kind], **overrides})


def random_model(config: GPTConfig, seed: int = 0) -> GPT:
    """Random weights everywhere (norms and biases too: default inits would hide mapping bugs)."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def trained_model(config: GPTConfig, tok: Tokenizer, steps: int = 600) -> GPT:
    """AdamW on the first 3,000 characters of the fixture text until the model knows them by heart (loss ~0.1):
    peaked next-token distributions, so greedy decoding has margins that f16 and q8_0 rounding cannot flip
    (a random tiny model's logits are flat: its greedy path turns on differences of 1e-3). One thread: on
    the shared 2-core machine 8 s a model instead of 30."""
    torch.manual_seed(0)
    model = GPT(config)
    ids = torch.tensor(tok.encode(TEXT[:3000]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    T = config.block_size
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            starts = torch.randint(len(ids) - T - 1, (8,))
            x = torch.stack([ids[s : s + T] for s in starts])
            y = torch.stack([ids[s + 1 : s + T + 1] for s in starts])
            loss = model(x, y).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.3
    return model.eval()


@pytest.fixture(scope="module")
def model_dirs(bpe, tmp_path_factory):
    """Our three test models (random weights), saved as model directories."""
    root = tmp_path_factory.mktemp("gguf-random")
    return {kind: save_model_dir(random_model(tiny(kind)), bpe, root / kind) for kind in SHAPES}


@pytest.fixture(scope="module")
def trained_dirs(bpe, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-trained")
    return {kind: save_model_dir(trained_model(tiny(kind), bpe), bpe, root / kind) for kind in SHAPES}


def fields(reader: GGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def tensor(reader: GGUFReader, name: str) -> np.ndarray:
    """A tensor of the file as float32 in its numpy shape (out, in), dequantized where it is quantized."""
    t = next(t for t in reader.tensors if t.name == name)
    data = quants.dequantize(t.data, t.tensor_type) if t.tensor_type == GGMLQuantizationType.Q8_0 else t.data
    return np.array(data, dtype=np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))


# ----------------------------------------------------------------------------------------------------
# Without llama.cpp: what the file holds


@pytest.mark.parametrize("kind", list(SHAPES))
def test_f32_file_holds_our_weights_config_and_tokenizer(kind, model_dirs, bpe, tmp_path):
    model, _ = load_model(model_dirs[kind])
    c, state = model.config, model.state_dict()
    out = export_gguf(model_dirs[kind], tmp_path / "m.gguf")
    assert out == (tmp_path / "m.gguf").resolve()
    r = GGUFReader(out)
    f = fields(r)
    arch = "llama" if kind.startswith("llama") else "gpt2"
    assert f["general.architecture"] == arch and f["general.file_type"] == 0  # ALL_F32
    expected = {
        "context_length": 64,
        "embedding_length": 64,
        "block_count": 2,
        "feed_forward_length": c.hidden_dim,
        "attention.head_count": 4,
        "attention.head_count_kv": c.kv_heads,
        "vocab_size": c.vocab_size,
    }
    for key, value in expected.items():
        assert f[f"{arch}.{key}"] == value, key
    if arch == "llama":
        assert f["llama.rope.freq_base"] == c.rope_theta and f["llama.rope.dimension_count"] == 16
        assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    else:
        assert f["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    # the tokenizer: llama.cpp's byte-level BPE, our vocabulary and merges, <|endoftext|> as BOS and EOS
    assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == c.vocab_size
    assert tokens[:VOCAB] == [bpe.hf.id_to_token(i) for i in range(VOCAB)]
    assert tokens[VOCAB:] == [f"[PAD{i}]" for i in range(VOCAB, c.vocab_size)]
    types = f["tokenizer.ggml.token_type"]
    assert types[bpe.eos_id] == 3 and types.count(3) == 1  # control: <|endoftext|> only
    assert types[VOCAB:] == [5] * (c.vocab_size - VOCAB) and types.count(1) == VOCAB - 1
    merges = f["tokenizer.ggml.merges"]
    assert len(merges) == VOCAB - 257 and all(len(m.split(" ")) == 2 for m in merges)
    assert f["tokenizer.ggml.bos_token_id"] == f["tokenizer.ggml.eos_token_id"] == bpe.eos_id
    assert f["tokenizer.ggml.add_bos_token"] is False and f["tokenizer.ggml.add_eos_token"] is False
    # the weights, exactly
    assert all(t.tensor_type == GGMLQuantizationType.F32 for t in r.tensors)
    names = {t.name for t in r.tensors}
    assert np.array_equal(tensor(r, "token_embd.weight"), state["transformer.wte.weight"].numpy())
    assert ("output.weight" in names) == (not c.tie_embeddings)
    if not c.tie_embeddings:
        assert np.array_equal(tensor(r, "output.weight"), state["lm_head.weight"].numpy())
    if arch == "gpt2":
        assert len(names) == 2 + 2 * 12 + 2 + (0 if c.tie_embeddings else 1)
        assert np.array_equal(tensor(r, "position_embd.weight"), state["transformer.wpe.weight"].numpy())
        for ours, theirs in (("attn.c_attn", "attn_qkv"), ("mlp.c_fc", "ffn_up"), ("ln_2", "ffn_norm")):
            weight = state[f"transformer.h.1.{ours}.weight"]
            bias = state.get(f"transformer.h.1.{ours}.bias", torch.zeros(weight.shape[0]))  # bias=False: zeros
            assert np.array_equal(tensor(r, f"blk.1.{theirs}.weight"), weight.numpy())
            assert np.array_equal(tensor(r, f"blk.1.{theirs}.bias"), bias.numpy())
    else:
        per_layer = 9 if not c.bias else 9 + 7
        assert len(names) == 2 + 2 * per_layer + (0 if c.tie_embeddings else 1)
        for kind_ in ("weight", "bias") if c.bias else ("weight",):
            q, k, v = (torch.from_numpy(tensor(r, f"blk.0.attn_{x}.{kind_}")) for x in "qkv")
            # undo the permutation (it is its own inverse only for head_dim 4; apply the inverse explicitly)
            unq, unk = (unpermute(t, n) for t, n in ((q, c.n_head), (k, c.kv_heads)))
            assert torch.equal(torch.cat([unq, unk, v]), state[f"transformer.h.0.attn.c_attn.{kind_}"])
            gate_up = torch.cat([torch.from_numpy(tensor(r, f"blk.0.ffn_{x}.{kind_}")) for x in ("gate", "up")])
            assert torch.equal(gate_up, state[f"transformer.h.0.mlp.c_fc.{kind_}"])


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def test_rope_permutation_gives_llama_cpp_rope_our_attention_scores():
    """Our RoPE (rotate half) on Q, K vs llama.cpp's (ggml's NORM mode: neighbours (2i, 2i+1) turn by
    pos * theta^(-2i/d)) on the permuted Q, K: the same vectors up to the permutation, so the same q.k."""
    torch.manual_seed(0)
    H, D, T, theta = 3, 16, 7, 10000.0
    x = torch.randn(1, T, H, D)
    cos, sin = rope_angles(torch.arange(T), D, theta)
    ours = apply_rope(x, cos, sin)  # (1, T, H, D)
    flat = x[0].permute(1, 2, 0).reshape(H * D, T)  # rows = the projection's output rows, one column per position
    permuted = rope_permute(flat, H).reshape(H, D, T).permute(2, 0, 1)  # (T, H, D), neighbours paired
    pos = torch.arange(T, dtype=torch.float)[:, None, None]
    angle = pos * theta ** (-torch.arange(0, D, 2, dtype=torch.float) / D)  # (T, 1, D/2)
    a, b = permuted[..., 0::2], permuted[..., 1::2]
    theirs = torch.stack((a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()), dim=-1).flatten(2)
    back = unpermute(theirs.permute(1, 2, 0).reshape(H * D, T), H).reshape(H, D, T).permute(2, 0, 1)
    assert torch.allclose(back, ours[0], atol=1e-5)
    scores = lambda v: torch.einsum("thd,shd->hts", v, v)  # noqa: E731
    assert torch.allclose(scores(theirs), scores(ours[0]), atol=1e-4)


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_f16_and_q8_0_store_matrices_in_their_type_and_keep_norms_f32(qtype, model_dirs, tmp_path):
    model, _ = load_model(model_dirs["gpt2"])
    state = model.state_dict()
    r = GGUFReader(export_gguf(model_dirs["gpt2"], tmp_path / "m.gguf", qtype=qtype))
    assert fields(r)["general.file_type"] == {"f16": 1, "q8_0": 7}[qtype]
    want = {"f16": GGMLQuantizationType.F16, "q8_0": GGMLQuantizationType.Q8_0}[qtype]
    types = {t.name: t.tensor_type for t in r.tensors}
    matrices = {n for n in types if n.endswith(".weight") and "norm" not in n and n != "position_embd.weight"}
    assert matrices == {"token_embd.weight"} | {f"blk.{i}.{m}.weight" for i in range(2) for m in MATRICES}
    assert all(types[n] == want for n in matrices)
    assert all(types[n] == GGMLQuantizationType.F32 for n in set(types) - matrices)
    w = state["transformer.h.0.mlp.c_fc.weight"].numpy()
    got = tensor(r, "blk.0.ffn_up.weight")
    if qtype == "f16":
        assert np.array_equal(got, w.astype(np.float16).astype(np.float32))
    else:  # 8 bits per value, one f16 scale (max |w| / 127) per block of 32: half a step, and the scale's rounding
        step = np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
        assert (np.abs(got - w).reshape(-1, 32) <= step * (0.5 + 127 * 2**-11)).all()
        assert 0 < np.abs(got - w).max() < 2e-3


MATRICES = ("attn_qkv", "attn_output", "ffn_up", "ffn_down")


def test_q8_0_falls_back_to_f16_for_rows_not_a_multiple_of_32(bpe, tmp_path):
    d = save_model_dir(random_model(tiny("llama_tied", mlp_hidden=48)), bpe, tmp_path / "m")
    types = {t.name: t.tensor_type for t in GGUFReader(export_gguf(d, tmp_path / "m.gguf", "q8_0")).tensors}
    assert types["blk.0.ffn_down.weight"] == GGMLQuantizationType.F16  # rows of 48
    assert types["blk.0.ffn_up.weight"] == types["token_embd.weight"] == GGMLQuantizationType.Q8_0  # rows of 64


def test_an_adapter_directory_is_merged_into_its_base(model_dirs, tmp_path):
    model, tok = load_model(model_dirs["llama_tied"])
    peft_model = add_lora(model, lora_config(rank=4, targets=["qkv", "mlp", "lm_head"])).eval()
    g = torch.Generator().manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    adapter = save_adapter_dir(
        peft_model, tok, tmp_path / "adapter", {"base": base_record(model_dirs["llama_tied"]), "task": {}}
    )
    merged = merge(peft_model).state_dict()
    r = GGUFReader(export_gguf(adapter, tmp_path / "m.gguf"))
    assert np.array_equal(tensor(r, "blk.1.ffn_down.weight"), merged["transformer.h.1.mlp.c_proj.weight"].numpy())
    assert np.array_equal(tensor(r, "blk.1.attn_v.weight"), merged["transformer.h.1.attn.c_attn.weight"][96:].numpy())
    # the LM head's adapter unties it: the file gets an output matrix of its own
    assert np.array_equal(tensor(r, "output.weight"), merged["lm_head.weight"].numpy())
    assert not np.array_equal(tensor(r, "output.weight"), tensor(r, "token_embd.weight"))


def test_a_chat_template_stored_with_the_model_goes_into_the_file(bpe, tmp_path):
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    files = {"tokenizer_config.json": {"chat_template": template}}
    d = save_model_dir(random_model(tiny("gpt2")), bpe, tmp_path / "chat", files=files)
    assert fields(GGUFReader(export_gguf(d, tmp_path / "chat.gguf")))["tokenizer.chat_template"] == template
    plain = save_model_dir(random_model(tiny("gpt2")), bpe, tmp_path / "plain")
    out = export_gguf(plain, tmp_path / "new" / "dir" / "plain.gguf")  # missing folders are made
    assert "tokenizer.chat_template" not in fields(GGUFReader(out))


def char_dir(tmp_path, bpe):
    tok = Tokenizer.char_level(TEXT)
    return save_model_dir(random_model(tiny("gpt2", vocab_size=tok.vocab_size)), tok, tmp_path / "char")


def whitespace_bpe_dir(tmp_path, bpe):
    hf = HFTokenizer.from_str(bpe.to_str())
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    return save_model_dir(random_model(tiny("gpt2")), Tokenizer(hf), tmp_path / "ws")


def bytes_missing_dir(tmp_path, bpe):
    vocab = {"a": 0, "b": 1, "ab": 2, EOS: 3}
    hf = HFTokenizer(models.BPE(vocab, [("a", "b")]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([EOS])
    return save_model_dir(random_model(tiny("gpt2")), Tokenizer(hf), tmp_path / "bytes")


@pytest.mark.parametrize(
    "make, needle",
    [
        (char_dir, "the tokenizer is char-level; llama.cpp has no such tokenizer type"),
        (whitespace_bpe_dir, "pre-tokenizer 'Whitespace'"),
        (bytes_missing_dir, "254 of the 256 byte tokens missing (e.g. '!')"),
        (
            lambda p, b: save_model_dir(random_model(tiny("gpt2", activation="gelu")), b, p / "m"),
            "activation='gelu' (the exact, erf GELU); llama.cpp's gpt2 architecture computes GELU's tanh form only",
        ),
        (
            lambda p, b: save_model_dir(random_model(tiny("gpt2", pos_emb="rope")), b, p / "m"),
            "pos_emb=rope, norm=layernorm, mlp=gelu) is neither",
        ),
        (
            lambda p, b: save_model_dir(random_model(tiny("llama_tied", norm="layernorm")), b, p / "m"),
            "no llama.cpp architecture computes the mix",
        ),
    ],
    ids=["char-level", "not byte-level", "bytes missing", "exact gelu", "rope + layernorm", "llama + layernorm"],
)
def test_what_gguf_cannot_hold_is_refused_by_name_before_writing(make, needle, bpe, tmp_path):
    src = make(tmp_path, bpe)
    out = tmp_path / "out" / "m.gguf"
    with pytest.raises(GPTError) as e:
        export_gguf(src, out)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not out.exists() and (not out.parent.exists() or not any(out.parent.iterdir()))


def test_an_existing_file_is_replaced_only_with_force_and_a_directory_never(model_dirs, tmp_path):
    src = model_dirs["gpt2"]
    out = tmp_path / "m.gguf"
    out.write_bytes(b"mine")
    with pytest.raises(GPTError, match="exists; choose another file name, or pass --force"):
        export_gguf(src, out)
    assert out.read_bytes() == b"mine"
    export_gguf(src, out, force=True)
    assert fields(GGUFReader(out))["general.architecture"] == "gpt2"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temporary file left behind
    folder = tmp_path / "folder.gguf"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep")
    with pytest.raises(GPTError, match="is a directory; give a file path"):
        export_gguf(src, folder, force=True)
    assert (folder / "keep.txt").read_text() == "keep"
    with pytest.raises(GPTError, match=r"must be a file name ending in \.gguf"):
        export_gguf(src, tmp_path / "config.json", force=True)
    with pytest.raises(GPTError, match=r"qtype must be one of \['f32', 'f16', 'q8_0'\]"):
        export_gguf(src, tmp_path / "q.gguf", qtype="q4_0")
    with pytest.raises(GPTError, match="does not exist"):
        export_gguf(tmp_path / "nowhere", tmp_path / "n.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.gguf", "m.gguf"]


def test_command_line_writes_the_file_and_refuses_in_one_line(model_dirs, bpe, tmp_path):
    out = tmp_path / "cli.gguf"
    proc = run_cli("-m gpt.convert", "export-gguf", str(model_dirs["llama_tied"]), str(out), "--qtype", "q8_0")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out.resolve()}" in proc.stdout
    assert "llama.cpp architecture llama, tensors F16/F32/Q8_0" in proc.stdout  # F16: ffn_down's rows of 176
    assert fields(GGUFReader(out))["general.file_type"] == 7
    again = run_cli("-m gpt.convert", "export-gguf", str(model_dirs["llama_tied"]), str(out))
    assert_user_error(again, "exists; choose another file name, or pass --force")
    char = char_dir(tmp_path, bpe)
    assert_user_error(run_cli("-m gpt.convert", "export-gguf", str(char), str(tmp_path / "c.gguf")), "char-level")
    assert not (tmp_path / "c.gguf").exists()


# ----------------------------------------------------------------------------------------------------
# In llama.cpp itself (llama-cpp-python)

# Largest |logit difference| allowed, llama.cpp vs ours, on the trained models (max |logit| 16 to 19). Measured
# (docs/gguf.md): f32 7e-6 for Llama; 3.2e-3 for GPT-2, all of it llama.cpp's GELU, which reads a table of f16 values
# (with that table in our model: 2.2e-4); f16 1.1e-2; q8_0 0.33 (2% of the largest logit).
TOLERANCE = {"f32": 1e-4, "f16": 3e-2, "q8_0": 5e-1}
GPT2_F32 = (1e-2, 1e-3)  # GPT-2 in f32: as it is, and with llama.cpp's f16 GELU table in our model
GREEDY = {"f32": 32, "f16": 16, "q8_0": 16}  # tokens that must agree (all 32 did, for every file)


def ggml_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU as llama.cpp's CPU backend computes it (GGML_GELU_FP16): the input rounded to f16, looked up in a
    table of tanh-GELU values stored in f16; 0 below -10 and x above 10."""
    y = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
    return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))


def llama_cpp(path: Path, monkeypatch, n_ctx: int = 64, extra_buffers: bool = True):
    """The file loaded in llama.cpp. extra_buffers=False is llama-cli's --no-repack: weights stay in llama.cpp's
    plain CPU buffers. q8_0 needs it on CPUs with AMX: there llama.cpp (0.3.36's, and llama.cpp issue #20824)
    puts q8_0 matrices in its AMX buffer, and ggml_backend_amx_mul_mat segfaults (its own quantizer's q8_0
    files too, at any width tried: 64 to 512)."""
    import llama_cpp  # installed by CI (pip install llama-cpp-python): missing is a failure, not a skip
    import llama_cpp.llama as llama_module

    defaults = llama_module.llama_cpp.llama_model_default_params

    def model_params():
        params = defaults()
        params.use_extra_bufts = extra_buffers
        return params

    monkeypatch.setattr(llama_module.llama_cpp, "llama_model_default_params", model_params)
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        logits_all=True,
        n_threads=2,
        type_k=llama_cpp.GGML_TYPE_F32,  # f32 attention cache: the default f16 one rounds keys and values
        type_v=llama_cpp.GGML_TYPE_F32,
        seed=0,
        verbose=False,
    )


def cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def cpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    """llama.cpp's own greedy sampler (temperature 0), n tokens, never stopping early."""
    llm.reset()
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if len(out) == n:
            break
    return out


def our_greedy(model: GPT, ids: list[int], n: int) -> list[int]:
    return generate(model, torch.tensor([ids]), n, temperature=0).tolist()[0]


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("kind", list(SHAPES))
def test_llama_cpp_decodes_and_scores_as_we_do(kind, qtype, trained_dirs, tmp_path, monkeypatch):
    model, tok = load_model(trained_dirs[kind])
    model.eval()
    path = export_gguf(trained_dirs[kind], tmp_path / f"{kind}-{qtype}.gguf", qtype=qtype)
    llm = llama_cpp(path, monkeypatch, extra_buffers=qtype != "q8_0")
    assert llm.n_vocab() == model.config.vocab_size  # (n_ctx: llama.cpp rounds it up to a multiple of 256)
    ids = tok.encode(TEXT[:200])[:48]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    theirs = cpp_logits(llm, ids)
    diff = float(np.abs(theirs - ours).max())
    print(f"{kind} {qtype}: max |dlogit| {diff:.2e} (max |logit| {np.abs(ours).max():.1f})")
    if qtype == "f32" and kind.startswith("gpt2"):  # the difference is llama.cpp's f16 GELU table, nothing else
        assert diff <= GPT2_F32[0]
        for block in model.transformer.h:
            block.mlp.act = ggml_gelu
        with torch.no_grad():
            emulated = model(torch.tensor([ids])).logits[0].numpy()
        print(f"  with llama.cpp's GELU table in our model: {np.abs(theirs - emulated).max():.2e}")
        assert np.abs(theirs - emulated).max() <= GPT2_F32[1]
        model, _ = load_model(trained_dirs[kind])
        model.eval()
    else:
        assert diff <= TOLERANCE[qtype]
    n = GREEDY[qtype]
    for prompt in PROMPTS:
        p = tok.encode(prompt)
        with torch.no_grad():
            want = our_greedy(model, p, 32)
        got = cpp_greedy(llm, p, 32)
        assert got[:n] == want[:n], (prompt, got, want)
        print(f"  {prompt!r}: {next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), 32)} of 32 equal")


@pytest.mark.slow
def test_llama_cpp_tokenizes_awkward_text_to_our_ids(trained_dirs, bpe, tmp_path, monkeypatch):
    llm = llama_cpp(export_gguf(trained_dirs["llama_tied"], tmp_path / "m.gguf"), monkeypatch)
    assert len(AWKWARD) == 20
    for s in AWKWARD:
        ids = bpe.encode(s)
        assert llm.tokenize(s.encode(), add_bos=False, special=False) == ids, s
        assert llm.detokenize(ids) == s.encode(), s
    # <|endoftext|> in text is our EOS; llama.cpp reads it so when asked to parse special tokens
    s = f"the end{EOS}A new start"
    assert llm.tokenize(s.encode(), add_bos=False, special=True) == bpe.encode(s)
    assert bpe.eos_id in bpe.encode(s) and llm.token_eos() == llm.token_bos() == bpe.eos_id
