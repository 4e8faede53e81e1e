"""The model: shapes refused, math path = SDPA path, cache = no cache, padding = no padding, sampling."""

import contextlib
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import PRESETS, preset
from hydra.utils import instantiate

from gpt.config import GPTConfig
from gpt.errors import GPTError
from gpt.fastdecode import RowTimesWeights
from gpt.generate import generate, sample_next_token
from gpt.model import GPT

ROOT = Path(__file__).resolve().parent.parent


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(block_size=32, vocab_size=61, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def set_impl(model: GPT, impl: str):
    for block in model.transformer.h:
        block.attn.use_sdpa = impl == "sdpa"


# -- configuration -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(n_embd=100, n_head=3), "divisible"),
        (dict(n_layer=0), "n_layer"),
        (dict(block_size=-1), "block_size"),
        (dict(dropout=1.5), "dropout"),
        (dict(activation="relu6"), "activation"),
        (dict(attn_impl="flash9"), "attn_impl"),
        (dict(vocab_size=0), "vocab_size"),
    ],
)
def test_impossible_shapes_are_refused(kw, needle):
    with pytest.raises(GPTError, match=needle):
        GPTConfig(**kw)


def test_model_needs_a_vocab_size():
    with pytest.raises(GPTError, match="vocab_size"):
        GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8))


def test_every_preset_builds_through_hydra_as_its_yaml_says():
    from conftest import train_config

    for name in PRESETS:
        cfg = train_config(f"model={name}")
        built = instantiate(cfg.model)
        assert asdict(built) == asdict(preset(name)) and built.n_layer > 0, name


def test_gpt2_presets_have_the_released_parameter_counts():
    # Published sizes (with tied embeddings): 124M, 355M, 774M, 1558M. Count on the meta device: no memory.
    expected = {"gpt2": 124.44e6, "gpt2-medium": 354.82e6, "gpt2-large": 774.03e6, "gpt2-xl": 1557.61e6}
    for name, n in expected.items():
        with torch.device("meta"):
            model = GPT(preset(name))
        assert abs(model.num_params(non_embedding=False) - n) / n < 1e-3, name


def test_weights_are_tied_and_residual_projections_scaled():
    model = GPT(GPTConfig(vocab_size=500, n_layer=8, n_head=4, n_embd=256, block_size=64))
    assert model.lm_head.weight is model.transformer.wte.weight
    std_proj = model.transformer.h[0].attn.c_proj.weight.std().item()
    std_fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(std_proj - 0.02 / math.sqrt(2 * 8)) < 0.0015
    assert abs(std_fc - 0.02) < 0.0015


def test_loss_ignores_minus_100_and_matches_cross_entropy():
    model = tiny()
    x = torch.randint(0, 61, (2, 10))
    y = torch.randint(0, 61, (2, 10))
    y[:, :4] = -100
    out = model(x, y)
    expected = F.cross_entropy(out.logits[:, 4:].reshape(-1, 61), y[:, 4:].reshape(-1))
    assert torch.allclose(out.loss, expected, atol=1e-6)


def test_attention_is_causal():
    # Changing a later token must not change the logits at earlier positions.
    model = tiny()
    x = torch.randint(0, 61, (1, 16))
    x2 = x.clone()
    x2[0, 10] = (x[0, 10] + 1) % 61
    a, b = model(x).logits, model(x2).logits
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-3)


# -- math path = SDPA path ---------------------------------------------------------------------------


def test_math_path_equals_sdpa_path_causal():
    model = tiny()
    x = torch.randint(0, 61, (3, 32))
    set_impl(model, "sdpa")
    fast = model(x).logits
    set_impl(model, "math")
    slow = model(x).logits
    assert (fast - slow).abs().max().item() <= 1e-5
    # need_weights takes the math path whatever the setting, and gives the same logits
    set_impl(model, "sdpa")
    out = model(x, need_weights=True)
    assert (out.logits - fast).abs().max().item() <= 1e-5


def test_math_path_equals_sdpa_path_with_padding_mask():
    model = tiny()
    x = torch.randint(0, 61, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[0, :7] = 0
    mask[2, :3] = 0
    set_impl(model, "sdpa")
    fast = model(x, attention_mask=mask).logits
    set_impl(model, "math")
    slow = model(x, attention_mask=mask).logits
    real = mask.bool()
    assert (fast - slow)[real].abs().max().item() <= 1e-5
    assert torch.isfinite(fast).all() and torch.isfinite(slow).all()


def test_math_path_equals_sdpa_path_with_kv_cache():
    model = tiny()
    x = torch.randint(0, 61, (2, 24))
    outs = {}
    for impl in ("sdpa", "math"):
        set_impl(model, impl)
        cache = model.new_cache()
        pieces = [model(x[:, :9], cache=cache).logits]  # prefill
        pieces += [model(x[:, t : t + 1], cache=cache).logits for t in range(9, 14)]  # one token at a time
        pieces.append(model(x[:, 14:], cache=cache).logits)  # a chunk after a prefix (explicit mask)
        outs[impl] = torch.cat(pieces, 1)
    assert (outs["sdpa"] - outs["math"]).abs().max().item() <= 1e-5


def test_attention_weights_are_a_causal_distribution():
    model = tiny()
    out = model(torch.randint(0, 61, (2, 12)), need_weights=True)
    assert len(out.attentions) == 2
    w = out.attentions[0]
    assert w.shape == (2, 4, 12, 12)
    assert torch.allclose(w.sum(-1), torch.ones(2, 4, 12), atol=1e-6)
    assert w.triu(diagonal=1).abs().max().item() == 0.0


# -- KV cache = full recompute ----------------------------------------------------------------------


def greedy_without_cache(model, idx, n):
    """Reference: recompute the whole sequence for every new token."""
    steps = []
    for _ in range(n):
        logits = model(idx).logits[:, -1]
        steps.append(logits)
        idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], 1)
    return idx, steps


def test_cache_gives_the_same_tokens_and_logits_as_recompute():
    model = tiny()
    prompt = torch.randint(0, 61, (1, 5))
    ref_idx, ref_logits = greedy_without_cache(model, prompt, 20)
    cache = model.new_cache()
    logits = model(prompt, cache=cache).logits[:, -1]
    idx = prompt
    for t in range(20):
        assert (logits - ref_logits[t]).abs().max().item() <= 1e-5, t
        nxt = logits.argmax(-1, keepdim=True)
        idx = torch.cat([idx, nxt], 1)
        logits = model(nxt, cache=cache).logits[:, -1]
    assert torch.equal(idx, ref_idx)
    assert torch.equal(generate(model, prompt, 20, temperature=0), ref_idx[:, 5:])


def padded_prompts(lengths, vocab=61):
    torch.manual_seed(2)
    T = max(lengths)
    idx = torch.randint(0, vocab, (len(lengths), T))
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, T - n :] = True
    return idx, mask


@pytest.mark.parametrize("lengths", [[3, 7, 5], [6, 6]])
def test_decode_step_logits_equal_a_full_recompute_with_left_padding(lengths):
    """The decode step (eager: the filled columns, under the mask of real ones when a row has padding) = the
    model on each row's real tokens. Rows of equal length have no padding: the step runs without a mask."""
    model = tiny()
    idx, mask = padded_prompts(lengths)
    cache = model.new_cache()
    model(idx, attention_mask=mask, cache=cache)
    cache.start_decoding()
    assert cache.padded == (len(set(lengths)) > 1)
    rows = [idx[i][mask[i]] for i in range(len(lengths))]
    for t in range(6):
        nxt = torch.randint(0, 61, (len(lengths),))
        logits = model.decode_step(nxt[:, None], cache)
        cache.length += 1
        for i in range(len(lengths)):
            rows[i] = torch.cat([rows[i], nxt[i : i + 1]])
            ref = model(rows[i][None]).logits[0, -1]
            assert (logits[i] - ref).abs().max().item() <= 1e-5, (t, i)


def test_compiled_decode_step_gives_the_eager_tokens(monkeypatch):
    # Inductor sets this variable whenever it loads a compiled library; unset it again afterwards, so that later
    # tests' run_cli still finds the environment the preloaded process was started with.
    monkeypatch.setenv("_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR", "0")
    model = tiny()
    idx, mask = padded_prompts([4, 9])
    eager = generate(model, idx, 12, attention_mask=mask, temperature=0)
    compiled = generate(model, idx, 12, attention_mask=mask, temperature=0, compile=True)
    assert torch.equal(compiled, eager)
    # The compiled step holds the weights as constants (freezing): an in-place change must reach it.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.5)
    changed = generate(model, idx, 12, attention_mask=mask, temperature=0)
    assert not torch.equal(changed, eager)
    assert torch.equal(generate(model, idx, 12, attention_mask=mask, temperature=0, compile=True), changed)


def test_one_row_linears_written_as_row_times_weights_give_the_same_logits():
    # Compiled batch-1 decoding rewrites every Linear as sum(W * x) (RowTimesWeights); the math must be the same
    # (biases included), also in bf16, where both accumulate in fp32 and round once.
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.05)):
        model = tiny().to(dtype)
        with torch.no_grad():  # biases start at zero
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
        idx = torch.randint(0, 61, (1, 7), generator=torch.Generator().manual_seed(3))
        logits = []
        for mode in (contextlib.nullcontext, RowTimesWeights):
            cache = model.new_cache()
            model(idx, cache=cache)
            cache.start_decoding()
            with torch.no_grad(), mode():
                logits.append(model.decode_step(idx[:, -1:], cache).float())
        scale = logits[0].abs().max().item()
        assert scale > 0.1
        assert (logits[0] - logits[1]).abs().max().item() <= tol * scale, dtype


def test_compiled_one_row_decoding_gives_the_eager_tokens(monkeypatch):
    monkeypatch.setenv("_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR", "0")  # as in the test above
    model = tiny()
    idx = torch.randint(0, 61, (1, 5), generator=torch.Generator().manual_seed(4))
    for _ in range(2):  # 40 new tokens in a 32-token context: the step also runs after a slide
        eager = generate(model, idx, 40, temperature=0)
        assert torch.equal(generate(model, idx, 40, temperature=0, compile=True), eager)
        with torch.no_grad():  # an in-place change of the weights must reach the compiled step
            for p in model.parameters():
                p.mul_(-1.5)


def test_batched_prompts_of_different_lengths_match_one_by_one():
    model = tiny()
    prompts = [torch.randint(0, 61, (n,)) for n in (3, 9, 6)]
    T = max(len(p) for p in prompts)
    idx = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, T - len(p) :] = p
        mask[i, T - len(p) :] = 1
    batched = generate(model, idx, 12, attention_mask=mask, temperature=0)
    for i, p in enumerate(prompts):
        alone = generate(model, p[None], 12, temperature=0)
        assert torch.equal(batched[i], alone[0]), i


def test_eos_stops_generation_and_pads_finished_rows():
    model = tiny()
    prompt = torch.randint(0, 61, (2, 4))
    free = generate(model, prompt, 10, temperature=0)
    eos = int(free[0, 2])  # the third token row 0 will produce
    out = generate(model, prompt, 10, temperature=0, eos_token_id=eos)
    row0 = out[0].tolist()
    assert row0[:3] == free[0, :3].tolist()
    assert all(t == eos for t in row0[3:])


def test_context_limit_stop_and_slide():
    model = tiny(block_size=16)
    prompt = torch.randint(0, 61, (1, 10))
    stopped = generate(model, prompt, 50, temperature=0, on_context_full="stop")
    assert stopped.shape[1] == 16 - 10 + 1  # 6 fill the cache, the 7th comes from the last logits
    slid = generate(model, prompt, 50, temperature=0, on_context_full="slide")
    assert slid.shape[1] == 50
    assert torch.equal(slid[:, :7], stopped)
    # after a slide the next token is what the model predicts from the most recent 3/4 of the context
    full = torch.cat([prompt, slid], 1)
    window = full[:, 17 - 12 : 17]
    assert int(model(window).logits[0, -1].argmax()) == int(full[0, 17])
    with pytest.raises(GPTError, match="context"):
        generate(model, torch.randint(0, 61, (1, 17)), 5)


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=-3), "max_new_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
    ],
)
def test_bad_sampling_arguments(kw, needle):
    model = tiny()
    args = dict(max_new_tokens=5, temperature=1.0)
    args.update(kw)
    with pytest.raises(GPTError, match=needle):
        generate(model, torch.zeros(1, 2, dtype=torch.long), **args)


# -- sampling ----------------------------------------------------------------------------------------


def test_top_k_and_top_p_only_draw_allowed_tokens():
    torch.manual_seed(0)
    logits = torch.randn(1, 50).repeat(4000, 1)
    top5 = set(torch.topk(logits[0], 5).indices.tolist())
    draws = sample_next_token(logits, 1.0, top_k=5)
    assert set(draws.tolist()) == top5  # all five drawn over 4000 tries, nothing else
    probs = F.softmax(logits[0], -1)
    order = torch.argsort(probs, descending=True)
    # the smallest prefix with mass >= 0.6
    n = int((probs[order].cumsum(0) < 0.6).sum()) + 1
    nucleus = set(order[:n].tolist())
    draws = sample_next_token(logits, 1.0, top_p=0.6)
    assert set(draws.tolist()) == nucleus
    draws = sample_next_token(logits, 1.0, top_k=3, top_p=0.999)
    assert set(draws.tolist()) <= set(order[:3].tolist())


def test_sampling_is_reproducible_with_a_seed():
    model = tiny()
    prompt = torch.randint(0, 61, (2, 4))

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return generate(model, prompt, 15, temperature=1.0, top_k=20, generator=g)

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_temperature_zero_is_argmax():
    logits = torch.randn(6, 30)
    assert torch.equal(sample_next_token(logits, 0.0), logits.argmax(-1))
