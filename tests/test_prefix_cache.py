"""The engine's prefix cache (gpt/prefixcache.py, gpt/engine.py): prompts that start like earlier ones reuse their
keys and values, and every request gets what it gets from the same engine without the cache: the same greedy
tokens, and each step's whole next-token distribution within 1e-5 (fp32)."""

import string

import pytest
import torch

from gpt.config import GPTConfig
from gpt.engine import Engine, Job
from gpt.model import GPT
from gpt.prefixcache import PrefixCache
from gpt.tokenizer import Tokenizer

ALPHABET = string.ascii_letters + " :\n.,!?"
BLOCK = 8  # the cache's granularity here: small, so that short prompts span several blocks
SYSTEM = "System: You are a terse helper, be brief.\n"  # 42 characters: five whole blocks


@pytest.fixture(scope="module")
def model_and_tok():
    tok = Tokenizer.char_level(ALPHABET)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=96, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():  # peaked logits: greedy choices are far from ties
        model.lm_head.weight.mul_(4)
    return model, tok


def run(engine, schedule):
    """Drive the engine step by step; schedule: {step: [(key, text, max_tokens[, settings])]} submitted at that step
    (settings: Job's sampling fields, and `seed` for a sampled one's random stream; none: greedy). Every job records
    its whole next-token distribution at each step (logprobs = the vocabulary). Returns {key: (done event, job)}."""
    vocab = engine.tokenizer.vocab_size
    done, jobs = {}, {}
    total = sum(map(len, schedule.values()))
    with torch.inference_mode():
        step = 0
        while len(done) < total:
            new = []
            for key, text, n, *settings in schedule.get(step, []):
                settings = dict(*settings)
                seed, temperature, top_p = settings.pop("seed", None), settings.pop("temperature", 0.0), None
                generator = None if seed is None else torch.Generator().manual_seed(seed)
                jobs[key] = Job(
                    engine.tokenizer.encode(text),
                    n,
                    temperature,
                    settings.pop("top_p", top_p),
                    [],
                    generator,
                    lambda e, key=key: done.__setitem__(key, e) if e[0] != "delta" else None,
                    logprobs=vocab,
                    **settings,
                )
                new.append(jobs[key])
            engine.submit(new)
            engine.step()
            step += 1
            assert step < 1000
    assert all(e[0] == "done" for e in done.values()), done
    return {key: (done[key], jobs[key]) for key in done}


def assert_same(cached, plain):
    """The same texts, finish reasons and tokens; each step's distribution within 1e-5."""
    assert cached.keys() == plain.keys()
    worst = 0.0
    for key in plain:
        (a, _), (b, _) = cached[key], plain[key]
        assert a[:4] == b[:4], key  # "done", finish reason, token count, text
        assert [s[0] for s in a[4]] == [s[0] for s in b[4]], key  # the tokens (and the end-of-text one)
        for sa, sb in zip(a[4], b[4]):  # every token's full distribution, by token id (not by rank: ties)
            da, db = dict(zip(sa[2], sa[3])), dict(zip(sb[2], sb[3]))
            assert da.keys() == db.keys()
            worst = max(worst, abs(sa[1] - sb[1]), max(abs(da[i] - db[i]) for i in da))
    assert worst < 1e-5, worst


def engines(model, tok, capacity, **kw):
    cache = PrefixCache(capacity, BLOCK)
    return Engine(model, tok, stop_at_eos=False, batch_window_s=0, prefix_cache=cache, **kw), Engine(
        model, tok, stop_at_eos=False, batch_window_s=0, **kw
    )


def whole(n):  # the tokens a prompt of n tokens can take from the cache at most: whole blocks, one token left
    return (n - 1) // BLOCK * BLOCK


def test_hits_partial_hits_and_misses_alone_and_in_one_batch_equal_the_engine_without_the_cache(model_and_tok):
    model, tok = model_and_tok
    first = SYSTEM + "User: Hi\nAssistant:"
    same_start = SYSTEM + "User: Who are you\nAssistant:"  # the system prompt's 5 blocks, then it parts
    partial = SYSTEM[:20] + "xyz, what is it?\nAssistant:"  # parts in block 3: two blocks reused
    other = "Once upon a time there was"  # a miss
    long_rest = "q" * 60  # a miss whose rest (60) and the hits' cached prefixes (40+) cannot share one pass
    schedule = {
        0: [("first", first, 6), ("other", other, 5)],  # both miss, read together
        12: [  # into an empty batch, together: hits, a partial hit, a repeat, a miss too long to share their pass
            ("same_start", same_start, 7),
            ("partial", partial, 5),
            ("again", first, 6),
            ("long_rest", long_rest, 4),
        ],
        14: [("late", same_start + " Hm", 9)],  # joins a running batch
    }
    cached_engine, plain_engine = engines(model, tok, 4096, max_batch_size=8)
    cached, plain = run(cached_engine, schedule), run(plain_engine, schedule)
    assert_same(cached, plain)
    reused = {key: job.reused for key, (_, job) in cached.items()}
    assert reused == {
        "first": 0,
        "other": 0,
        "same_start": 48,  # SYSTEM + "User: " (48 characters): 6 whole blocks
        "partial": 16,
        "again": whole(len(first)),
        "long_rest": 0,
        "late": whole(len(same_start)),  # same_start's whole prompt, and no more: read 2 steps before
    }
    assert {job.reused for _, job in plain.values()} == {0}
    assert cached_engine.prefix_cache.reused == sum(reused.values())


def test_a_finished_text_serves_the_next_turn_of_its_conversation(model_and_tok):
    """The conversation so far (prompt and reply, as a chat's next request sends it) is read from the cache: past
    the first prompt, up to the last token the engine fed."""
    model, tok = model_and_tok
    first = SYSTEM + "User: Hi\nAssistant:"
    cached_engine, plain_engine = engines(model, tok, 4096)
    reply = run(plain_engine, {0: [("first", first, 12)]})["first"][0][3]
    follow = first + reply + "\nUser: And?\nAssistant:"
    schedule = {0: [("first", first, 12)], 20: [("follow", follow, 6)]}
    cached, plain = run(cached_engine, schedule), run(plain_engine, schedule)
    assert_same(cached, plain)
    # the engine fed the prompt and all but the last of its 12 tokens
    assert cached["follow"][1].reused == (len(first) + 11) // BLOCK * BLOCK > whole(len(first))


def test_eviction_drops_the_least_recently_used_ends_first_and_outputs_stay_the_same(model_and_tok):
    """A cache of 4 blocks. The first prompt fills it; a 2-block prompt then takes the place of the first's last two
    blocks (the ends of the least recently used sequence); the first prompt again reuses what is left."""
    model, tok = model_and_tok
    first, short = SYSTEM + "User: Hi\nAssistant:", "Another thing, yes"  # 61 tokens (7 whole blocks), 18 (2)
    a, b = tok.encode(first), tok.encode(short)
    cached_engine, plain_engine = engines(model, tok, 4 * BLOCK + 3)  # 35 tokens: room for 4 whole blocks
    cache = cached_engine.prefix_cache

    def wave(key, text):  # one request on each engine, the same outputs; its reuse
        cached, plain = run(cached_engine, {0: [(key, text, 2)]}), run(plain_engine, {0: [(key, text, 2)]})
        assert_same(cached, plain)
        for k in cache.blocks:  # no block without its parent (a lookup never meets a gap)
            assert len(k) == BLOCK or k[:-BLOCK] in cache.blocks
        assert cache.tokens <= 4 * BLOCK
        return cached[key][1].reused

    assert wave("first", first) == 0
    assert list(cache.blocks) == [tuple(a[:n]) for n in (32, 24, 16, 8)]  # least recently used first
    assert wave("short", short) == 0
    assert list(cache.blocks) == [tuple(a[:16]), tuple(a[:8]), tuple(b[:16]), tuple(b[:8])]
    assert wave("again", first) == 2 * BLOCK
    assert list(cache.blocks) == [tuple(a[:n]) for n in (32, 24, 16, 8)]
    assert cache.reused == 2 * BLOCK
    # evicted entirely: room for 2 blocks, and another prompt of 2 blocks
    cached_engine, plain_engine = engines(model, tok, 2 * BLOCK)
    cache = cached_engine.prefix_cache
    assert [wave("first", first), wave("short", short), wave("again", first)] == [0, 0, 0]


def test_the_prefix_cache_stores_what_a_full_read_computes(model_and_tok):
    """Every cached block holds the keys and values a plain forward pass over its prefix computes (1e-5)."""
    model, tok = model_and_tok
    engine, _ = engines(model, tok, 4096)
    run(engine, {0: [("a", SYSTEM + "User: Hi\nAssistant:", 5), ("b", "Once upon a time there was", 3)]})
    cache = engine.prefix_cache
    # "a": 61 + 4 tokens fed (its last one is not), 8 whole blocks (7 read, 1 decoded); "b": 26 + 2, 3 blocks
    assert cache.stored == cache.tokens == 11 * BLOCK
    with torch.inference_mode():
        for key, (k, v) in cache.blocks.items():
            kv = model.new_cache()
            model(torch.tensor([key]), cache=kv)
            want_k = torch.stack([kv.k[layer][0, :, len(key) - BLOCK : len(key)] for layer in range(len(kv.k))])
            want_v = torch.stack([kv.v[layer][0, :, len(key) - BLOCK : len(key)] for layer in range(len(kv.v))])
            assert torch.allclose(k, want_k, atol=1e-5, rtol=0) and torch.allclose(v, want_v, atol=1e-5, rtol=0)


def test_each_rows_sampling_settings_apply_to_prompts_read_from_the_cache(model_and_tok):
    """Hits with their own settings in one batch (penalties over the whole prompt, cached part included;
    logit_bias; top_k, top_p, min_p on seeded sampled rows): the same tokens as the engine without the cache."""
    model, tok = model_and_tok
    first = SYSTEM + "User: Hi\nAssistant:"
    bias = {tok.encode("e")[0]: -100.0, tok.encode("x")[0]: 5.0}
    schedule = {
        0: [("first", first, 4)],
        8: [
            ("repeat", first + " Hm", 8, {"repetition_penalty": 3.0}),  # its prompt's letters, from the cache too
            ("fp", SYSTEM + "User: Hey", 8, {"frequency_penalty": 1.5, "presence_penalty": 0.5}),
            ("bias", first, 6, {"logit_bias": bias}),
            ("sampled", SYSTEM + "User: Yo", 8, {"seed": 3, "temperature": 0.9, "top_k": 5, "min_p": 0.05}),
            ("nucleus", first + " Ok", 8, {"seed": 4, "temperature": 1.2, "top_p": 0.8, "repetition_penalty": 0.9}),
        ],
    }
    cached_engine, plain_engine = engines(model, tok, 4096, max_batch_size=8)
    cached, plain = run(cached_engine, schedule), run(plain_engine, schedule)
    assert_same(cached, plain)
    assert all(cached[key][1].reused >= 40 for key in ("repeat", "fp", "bias", "sampled", "nucleus"))
    greedy = run(plain_engine, {0: [("bias", first, 6)]})
    assert "e" not in cached["bias"][0][3] and cached["bias"][0][3] != greedy["bias"][0][3]  # the bias did act
    for key, text in (("repeat", first + " Hm"), ("fp", SYSTEM + "User: Hey")):  # the penalties did act
        assert cached[key][0][3] != run(plain_engine, {0: [(key, text, 8)]})[key][0][3], key
