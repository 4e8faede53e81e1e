"""Decoding options used for evaluation: no-repeat n-grams, beam search, stop strings on batches."""

from types import SimpleNamespace

import pytest
import sacrebleu
import torch
import torch.nn.functional as F

from gpt.config import GPTConfig
from gpt.errors import GPTError
from gpt.generate import ban_repeated_ngrams, beam_search, generate
from gpt.model import GPT

EOS = 0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=48, vocab_size=23, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():  # a peaked, repetitive distribution, so loops and beam choices actually happen
        m.lm_head.weight.mul_(8)
    return m


def prompts():
    torch.manual_seed(1)
    idx = torch.randint(1, 23, (4, 9))
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[1, :3] = mask[3, :5] = False  # left padding
    return idx, mask


def sequence_logprob(model, prompt, new):
    """log p(new | prompt) by one full forward pass (no cache), up to and including the first EOS."""
    if (new == EOS).any():
        new = new[: int((new == EOS).nonzero()[0]) + 1]
    ids = torch.cat([prompt, new])[None]
    logp = F.log_softmax(model(ids).logits[0, len(prompt) - 1 : -1].float(), -1)
    return float(logp.gather(-1, new[:, None]).sum().detach())


def test_no_repeat_ngram_off_is_plain_greedy_and_on_never_repeats(model):
    idx, mask = prompts()
    plain = generate(model, idx, 30, attention_mask=mask, temperature=0)
    assert torch.equal(generate(model, idx, 30, attention_mask=mask, temperature=0, no_repeat_ngram_size=0), plain)
    for n in (2, 3):
        out = generate(model, idx, 30, attention_mask=mask, temperature=0, no_repeat_ngram_size=n)
        for row in out.tolist():
            grams = [tuple(row[i : i + n]) for i in range(len(row) - n + 1)]
            assert len(grams) == len(set(grams)), (n, row)
    # the unconstrained model does loop here, so the constraint changed something
    assert any(len({tuple(r[i : i + 2]) for i in range(len(r) - 1)}) < len(r) - 1 for r in plain.tolist())


def test_ban_repeated_ngrams_bans_exactly_the_completing_tokens():
    logits = torch.zeros(1, 10)
    generated = torch.tensor([[3, 4, 5, 3, 4, 7, 3]])  # bigrams starting with 3: (3,4) twice
    banned = ban_repeated_ngrams(logits, generated, 2)
    assert torch.isinf(banned[0]).nonzero().flatten().tolist() == [4]
    banned = ban_repeated_ngrams(logits, generated, 3)  # trigrams (x, 3, ?) where x = 7: none seen
    assert not torch.isinf(banned).any()


def test_beam_search_with_one_beam_is_greedy(model):
    idx, mask = prompts()
    greedy = generate(model, idx, 20, attention_mask=mask, temperature=0, eos_token_id=EOS)
    beam = beam_search(model, idx, 20, num_beams=1, eos_token_id=EOS, attention_mask=mask, length_penalty=0.0)
    n = min(greedy.size(1), beam.size(1))
    assert torch.equal(beam[:, :n], greedy[:, :n])
    # up to the context's end: a prompt of block - 1 tokens has room for 2 new ones, a full one for 1
    block = model.config.block_size
    for T, room in ((block - 1, 2), (block, 1)):
        full = torch.randint(1, 23, (2, T), generator=torch.Generator().manual_seed(T))
        greedy = generate(model, full, 5, temperature=0, on_context_full="stop")
        beam = beam_search(model, full, 5, num_beams=1, eos_token_id=EOS, length_penalty=0.0)
        assert greedy.size(1) == room and torch.equal(beam[:, :room], greedy), T


def test_streamed_text_never_shows_what_a_stop_string_cuts():
    """Byte-level BPE pieces can end inside a character (decoded as U+FFFD): what is printed token by token
    must always equal the final text, cut at the first stop string."""
    import io

    from gpt.completions import StreamPrinter, cut_at_stop
    from gpt.tokenizer import Tokenizer

    corpus = ["héllo wörld — ça va? 日本語のテキスト 😀😀 end\n\nnext para", "naïve café — 東京 😀 ok\n\n"] * 50
    tok = Tokenizer.train_bpe(iter([corpus]), 300, show_progress=False)
    for text in ("héllo 日本 😀 wörld\n\nrest", "ab — cd END more", "東京😀END", "😀😀😀 a"):
        ids = tok.encode(text)
        for stops in (["\n\n"], ["END"], ["😀E"], ["—"], ["日本"], []):
            expected = cut_at_stop(tok.decode(ids), stops)[0]
            out = io.StringIO()
            printer = StreamPrinter(tok, stops, out)
            for i in ids:
                stopped = printer(torch.tensor([i]))
                assert expected.startswith(out.getvalue()), (text, stops, out.getvalue())  # nothing to take back
                if stopped:
                    break
            assert printer.finish() == expected and out.getvalue() == expected, (text, stops)


def test_wide_beam_search_finds_the_exact_most_likely_output():
    """With beams enough to keep every prefix, beam search is exhaustive: it must return the best of all
    outputs of 3 new tokens, ended by EOS or cut by max_new_tokens (as transformers' beam search counts them),
    found here by brute force without the KV cache."""
    import itertools

    torch.manual_seed(3)
    model = GPT(GPTConfig(block_size=16, vocab_size=5, n_layer=2, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4)
    idx = torch.randint(1, 5, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, :2] = False  # one left-padded row
    beam = beam_search(model, idx, 3, num_beams=64, eos_token_id=EOS, attention_mask=mask, length_penalty=0.0)
    cut = False
    for row in range(3):
        prompt = idx[row][mask[row]]
        outputs = [torch.tensor([*body, EOS]) for n in range(3) for body in itertools.product(range(1, 5), repeat=n)]
        outputs += [torch.tensor(body) for body in itertools.product(range(1, 5), repeat=3)]  # unfinished at the limit
        best = max(outputs, key=lambda out: sequence_logprob(model, prompt, out))
        ended = (beam[row] == EOS).nonzero()
        got = beam[row][: int(ended[0]) + 1] if len(ended) else beam[row]
        assert got.tolist() == best.tolist(), row
        cut |= best[-1].item() != EOS
    assert cut  # an output cut by max_new_tokens won somewhere: the case this checks happened


def test_wide_beam_search_with_a_stop_token_finds_the_exact_most_likely_output():
    """A stop token ends a beam like EOS but stays in the output: the best of all outputs of up to 3 tokens
    that end in EOS or in the stop token (4), by brute force."""
    import itertools

    torch.manual_seed(11)
    model = GPT(GPTConfig(block_size=16, vocab_size=5, n_layer=2, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4)
    idx = torch.randint(1, 5, (4, 5))
    beam = beam_search(model, idx, 3, num_beams=64, eos_token_id=EOS, length_penalty=0.0, stop_token_ids=[4])
    found_stop = False
    for row in range(4):
        outputs = [
            torch.tensor([*body, end])
            for n in range(3)
            for body in itertools.product(range(1, 4), repeat=n)
            for end in (EOS, 4)
        ]
        best = max(outputs, key=lambda out: sequence_logprob(model, idx[row], out))
        end = int(((beam[row] == EOS) | (beam[row] == 4)).nonzero()[0])
        assert beam[row][: end + 1].tolist() == best.tolist(), row
        found_stop |= best[-1].item() == 4
    assert found_stop  # the case where the stop token matters happened


def test_beam_search_needs_greedy_settings(model):
    idx, _ = prompts()
    with pytest.raises(GPTError, match="num_beams"):
        beam_search(model, idx, 5, num_beams=0, eos_token_id=EOS)


def test_copy_bonus_steers_towards_the_source_tokens_and_zero_changes_nothing():
    from gpt.completions import generate_batch, source_token_bias
    from gpt.tokenizer import Tokenizer

    tok = Tokenizer.char_level("abcdefghij :")
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16)).eval()
    prompts, sources = ["abc: ", "hij: "], ["bad", "jig"]
    bias = source_token_bias(tok, sources, tok.vocab_size, 2.5, "cpu")
    assert [sorted(tok.decode([i]) for i in row.nonzero().flatten().tolist()) for row in bias] == [
        [" ", "a", "b", "d"],
        [" ", "g", "i", "j"],
    ]
    assert set(bias.unique().tolist()) == {0.0, 2.5}
    args = dict(max_new_tokens=12, temperature=0.0, stop_at_eos=False)
    plain = generate_batch(m, tok, prompts, **args)
    assert generate_batch(m, tok, prompts, copy_bonus=0.0, sources=sources, **args) == plain
    for beams in (1, 3):
        steered = generate_batch(
            m, tok, prompts, copy_bonus=1e4, sources=sources, num_beams=beams, **{**args, "stop_at_eos": beams > 1}
        )
        for text, source in zip(steered, sources):  # nothing but the source's characters (and the space)
            assert text and set(text) <= set(source) | {" "}, (text, source)
    assert steered != plain
    with pytest.raises(GPTError, match="copy_bonus must be >= 0"):
        generate_batch(m, tok, prompts, copy_bonus=-1.0, **args)


def test_int8_weights_stay_close_to_the_model_and_decode_like_full_recomputation(model):
    import copy

    from gpt.inference import quantize_weights

    quantized = quantize_weights(copy.deepcopy(model), "int8")
    linears = [m for m in quantized.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 4 + 1 and all(m.weight.qdata.dtype == torch.int8 for m in linears)
    idx, _ = prompts()
    with torch.no_grad():
        exact, approx = model(idx).logits, quantized(idx).logits
    # one scale per output row: each weight is off by at most half a step (max |row| / 254)
    assert (approx - exact).abs().max() <= 0.02 * exact.abs().max()
    assert not torch.equal(approx, exact)
    # greedy decoding with the cache still equals full recomputation on the quantized weights
    new = generate(quantized, idx[:1], 6, temperature=0)
    seq = idx[:1]
    for t in range(6):
        with torch.no_grad():
            assert quantized(seq).logits[0, -1].argmax() == new[0, t]
        seq = torch.cat([seq, new[:, t : t + 1]], 1)
    with pytest.raises(GPTError, match="quantize must be null or int8"):
        quantize_weights(copy.deepcopy(model), "int4")


def test_sampled_batch_outputs_do_not_depend_on_the_batch_size():
    """Each prompt samples from its own stream (seed, prompt index): the same seed gives each prompt the same
    completion in batches of 1, 2 or 5, and whatever the other prompts are; two runs of one prompt differ."""
    from gpt.completions import generate_batch
    from gpt.tokenizer import Tokenizer

    tok = Tokenizer.char_level("abcdefghij :")
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16)).eval()
    prompts = ["abc: ", "hij: ", "a", "abc: ", "jihgfedcba "]  # different lengths: sorted, padded batches
    args = dict(max_new_tokens=20, temperature=1.0, top_k=8, stop_at_eos=False)
    runs = [
        generate_batch(m, tok, prompts, batch_size=b, generator=torch.Generator().manual_seed(7), **args)
        for b in (1, 2, 5)
    ]
    assert runs[0] == runs[1] == runs[2]
    assert runs[0][0] != runs[0][3]  # the same prompt twice: two draws, not one copied
    alone = generate_batch(m, tok, prompts[3:4], generator=torch.Generator().manual_seed(7), **args)
    assert alone == [runs[0][0]]  # the stream belongs to the line number: alone, "abc: " is line 0 again
    assert generate_batch(m, tok, prompts, generator=torch.Generator().manual_seed(8), **args) != runs[0]
    # past the context (64): each prompt slides (or stops) where it would alone, not where its padded batch does
    for full in ("slide", "stop"):
        long = dict(args, max_new_tokens=90, on_context_full=full)
        alone, batched = (
            generate_batch(m, tok, prompts, batch_size=b, generator=torch.Generator().manual_seed(7), **long)
            for b in (1, 5)
        )
        assert batched == alone, full
    assert len(alone[2]) > len(alone[0])  # stop: "a" goes further than "abc: " before the context is full


A, B, C, START = 1, 2, 3, 4
CHAIN = torch.full((5, 5), 1e-6)
CHAIN[START, A], CHAIN[START, B], CHAIN[START, EOS] = 0.5, 0.3, 0.2
CHAIN[A, C], CHAIN[A, EOS] = 0.9, 0.1
CHAIN[B, EOS], CHAIN[B, C] = 0.9, 0.1
CHAIN[C, EOS] = CHAIN[EOS, EOS] = 0.95


class Chain(torch.nn.Module):
    """A Markov chain as a model: the next token's probabilities are CHAIN's row of the last token."""

    config = SimpleNamespace(block_size=16)

    def new_cache(self):
        return SimpleNamespace(reorder=lambda src: None)

    def forward(self, idx, attention_mask=None, cache=None, only_last=True):
        return SimpleNamespace(logits=CHAIN.log()[idx[:, -1]][:, None, :])


def test_beam_search_keeps_going_while_a_running_beam_would_win():
    """A row is not done at its first num_beams finished outputs while a running beam, ended now, would
    score better (transformers' early_stopping=False rule); stopping there favoured short outputs. The model is
    a Markov chain: from the prompt, A (p 0.5) or B (0.3); from A, C (0.9); from B, EOS (0.9); from C, EOS (0.95).
    With 2 beams, step 2 finishes B EOS and A EOS (two finished outputs) while A C runs on: A C EOS
    (log-probability -0.85) beats B EOS (-1.31), by plain log-probability and per token alike."""
    for length_penalty in (0.0, 1.0):
        out = beam_search(
            Chain(), torch.tensor([[START]]), 6, num_beams=2, eos_token_id=EOS, length_penalty=length_penalty
        )
        assert out[0, :3].tolist() == [A, C, EOS], length_penalty


def test_beam_search_returns_its_n_best_best_first(model):
    # the chain: A C EOS (0.5 * 0.9 * 0.95), then B EOS (0.3 * 0.9); A EOS (0.05) is third
    out = beam_search(Chain(), torch.tensor([[START]]), 6, num_beams=2, eos_token_id=EOS, num_return_sequences=2)
    assert out.shape[0] == 2 and out[0, :3].tolist() == [A, C, EOS] and out[1, :2].tolist() == [B, EOS]
    # on a model: the first of each row's n-best is its 1-best, and the n-best are n different texts
    idx, mask = prompts()
    args = dict(num_beams=3, eos_token_id=EOS, attention_mask=mask, length_penalty=1.0)
    best, nbest = beam_search(model, idx, 12, **args), beam_search(model, idx, 12, **args, num_return_sequences=3)
    assert nbest.shape == (3 * idx.size(0), best.size(1)) and torch.equal(nbest[::3], best)
    assert all(len({tuple(r) for r in nbest[3 * b : 3 * b + 3].tolist()}) == 3 for b in range(idx.size(0)))
    with pytest.raises(GPTError, match="num_return_sequences must be 1..num_beams=3"):
        beam_search(model, idx, 12, **args, num_return_sequences=4)


CANDIDATES = [
    "good morrow",
    "thou art a villain .",
    "you are a villain .",
    "thou art a knave , sir .",
    "thou art a villain , sir .",
]


@pytest.mark.parametrize(
    "utility, sentence_score", [("chrf", sacrebleu.sentence_chrf), ("bleu", sacrebleu.sentence_bleu)]
)
def test_mbr_chooses_the_candidate_that_agrees_most_with_the_others(utility, sentence_score):
    from gpt.mbr import mbr_select

    n = len(CANDIDATES)
    means = [
        sum(sentence_score(c, [o]).score for o in CANDIDATES[:i] + CANDIDATES[i + 1 :]) / (n - 1)
        for i, c in enumerate(CANDIDATES)
    ]
    assert mbr_select(CANDIDATES, utility) == means.index(max(means)) != 0  # not the outlier listed first
    assert mbr_select(["good morrow"], utility) == 0  # one candidate: itself
    assert mbr_select(["a b c", "x y z", "a b c"], utility) == 0  # of equals, the first


def test_mbr_candidates_are_the_n_best_the_samples_and_the_source():
    from gpt.completions import generate_batch
    from gpt.mbr import mbr_candidates, mbr_decode, mbr_select
    from gpt.tokenizer import Tokenizer

    tok = Tokenizer.char_level("abcdefghij :")
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16)).eval()
    prompts, sources = ["abc: ", "hij: ", "a"], ["bad", "jig", "a"]
    args = dict(max_new_tokens=8, batch_size=2, copy_bonus=1.0, no_repeat_ngram_size=2)
    seed = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    mbr = dict(sources=sources, num_beams=3, samples=2, temperature=1.0, **args)
    got = mbr_candidates(m, tok, prompts, include_source=True, generator=seed(), **mbr)
    nbest = generate_batch(m, tok, prompts, sources=sources, temperature=0, num_beams=3, num_return_sequences=3, **args)
    assert nbest[::3] == generate_batch(m, tok, prompts, sources=sources, temperature=0, num_beams=3, **args)
    twice = [p for p in prompts for _ in range(2)]
    drawn = generate_batch(
        m, tok, twice, sources=[s for s in sources for _ in range(2)], temperature=1.0, generator=seed(), **args
    )
    assert got == [nbest[3 * i : 3 * i + 3] + drawn[2 * i : 2 * i + 2] + [sources[i]] for i in range(3)]
    assert mbr_candidates(m, tok, prompts, include_source=False, generator=seed(), **mbr) == [c[:-1] for c in got]
    chosen = mbr_decode(m, tok, prompts, utility="chrf", include_source=True, generator=seed(), **mbr)
    assert chosen == [c[mbr_select(c, "chrf")] for c in got]
    # one candidate (the greedy text, no samples, no source): MBR is greedy decoding
    one = dict(mbr, num_beams=1, samples=0)
    assert mbr_decode(m, tok, prompts, utility="bleu", include_source=False, **one) == generate_batch(
        m, tok, prompts, sources=sources, temperature=0, **args
    )


@pytest.mark.parametrize(
    "settings, needle",
    [
        ((True, 0, True, "rouge", 1.0), "mbr_utility must be one of ['chrf', 'bleu']"),
        ((True, -1, True, "chrf", 1.0), "mbr_samples must be an integer >= 0"),
        ((False, 4, True, "chrf", 1.0), "mbr_samples draws candidates for mbr=true"),
        ((True, 4, True, "chrf", 0.0), "mbr_samples=4 samples its candidates: temperature must be > 0"),
        ((True, 0, "yes", "chrf", 1.0), "mbr_include_source is true or false"),
    ],
)
def test_mbr_settings_are_checked(settings, needle):
    from gpt.mbr import check_mbr

    with pytest.raises(GPTError) as e:
        check_mbr(*settings)
    assert needle in str(e.value)
    with pytest.raises(GPTError, match="eval.mbr_temperature must be > 0"):
        check_mbr(True, 4, True, "chrf", 0.0, prefix="eval.")
