"""Tokenizers, corpus resolution, the token store and the batches drawn from it."""

import io
import json
import os
import urllib.request

import numpy as np
import pytest
import torch

from gpt.data import (
    FixedWindows,
    RandomWindows,
    TextDataModule,
    TextSource,
    check_text_files,
    prepare_corpus,
    token_dtype,
)
from gpt.datafiles import resolve_files
from gpt.errors import GPTError
from gpt.tokenizer import EOS, Tokenizer

SHAKESPEARE_SHA = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


# -- tokenizers --------------------------------------------------------------------------------------


def test_char_tokenizer_round_trip_and_reload(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    tok = Tokenizer.char_level(text)
    ids = tok.encode(text)
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text
    assert tok.vocab_size == len(set(text)) + 2  # + <|endoftext|> and <|unk|>
    assert tok.eos_id is not None and tok.decode([tok.eos_id]) == ""
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert again.encode(text) == ids and again.kind == "char"


def test_char_tokenizer_strict_refuses_unknown_characters():
    tok = Tokenizer.char_level("abc ")
    assert tok.encode("abz", strict=False)[-1] == tok.unk_id
    with pytest.raises(GPTError, match="'z'"):
        tok.encode("abz", strict=True)


def test_bpe_tokenizer_round_trips_any_text(shakespeare, tmp_path):
    lines = shakespeare.read_text().splitlines(keepends=True)[:4000]
    tok = Tokenizer.train_bpe(iter([lines]), vocab_size=400, show_progress=False)
    assert tok.vocab_size == 400 and tok.kind == "bpe"
    for text in ["ROMEO:\nWherefore art thou?\n", "naïve café — 東京 😀", "  spaces\tand\ttabs  "]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    assert len(tok.encode("ROMEO: what say you?")) < len("ROMEO: what say you?")  # it learned merges
    tok.save(tmp_path)
    assert Tokenizer.load(tmp_path).encode("to be or not") == tok.encode("to be or not")
    assert tok.eos_id == tok.hf.token_to_id(EOS) and tok.decode([tok.eos_id]) == ""


def test_bpe_vocab_size_too_small():
    with pytest.raises(GPTError, match="at least 257"):
        Tokenizer.train_bpe(iter([["abc"]]), vocab_size=100, show_progress=False)


# -- finding the corpus ------------------------------------------------------------------------------


def test_explicit_path_wins_then_data_dir_then_download(tmp_path, monkeypatch):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "a.txt").write_text("from the data dir")
    own = tmp_path / "own.txt"
    own.write_text("mine")
    monkeypatch.setenv("GPT_DATA_DIR", str(tmp_path))
    assert resolve_files(path=str(own), relpath="ds/a.txt") == [own]
    assert resolve_files(relpath="ds/a.txt") == [tmp_path / "ds" / "a.txt"]
    # globs
    (tmp_path / "ds" / "b.txt").write_text("b")
    assert [p.name for p in resolve_files(path=str(tmp_path / "ds" / "*.txt"))] == ["a.txt", "b.txt"]

    # missing locally -> downloaded into $GPT_DATA_DIR/<relpath>, sha256 checked
    payload = b"downloaded text\n"
    import hashlib

    class Resp:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read(self):
            return payload

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=0: Resp())
    got = resolve_files(relpath="new/x.txt", url="http://example/x", sha256=hashlib.sha256(payload).hexdigest())
    assert got == [tmp_path / "new" / "x.txt"] and got[0].read_bytes() == payload
    with pytest.raises(GPTError, match="sha256"):
        resolve_files(relpath="new/y.txt", url="http://example/y", sha256="0" * 64)
    assert not (tmp_path / "new" / "y.txt").exists()


def test_the_named_task_downloads_its_pairs_checked_by_sha256(tmp_path, monkeypatch, pairs_dir):
    """configs/task/shakespeare_modern.yaml on an empty $GPT_DATA_DIR: each of the four files comes from its
    URL (the authors' release), is checked against its sha256 and read; offline, one line says where to put it."""
    import hashlib

    from test_finetune import compose_task

    from gpt import datafiles as data
    from gpt.tasks import TaskDataModule
    from gpt.tokenizer import Tokenizer

    served = {}
    for rel in [k for k in data.KNOWN_FILES if k.startswith("shakespeare_modern/")]:
        body = (pairs_dir / rel.split("/")[1]).read_bytes()  # stand-ins for the real bytes, with their sha256
        url = data.KNOWN_FILES[rel][0]
        served[url] = body
        monkeypatch.setitem(data.KNOWN_FILES, rel, (url, hashlib.sha256(body).hexdigest()))
    assert all(u.startswith(data.PAIRS_URL) and u.endswith(".nltktok") for u in served)

    class Resp(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    asked = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=0: asked.append(url) or Resp(served[url]))
    monkeypatch.setenv("GPT_DATA_DIR", str(tmp_path / "data"))
    task = compose_task("shakespeare_modern")
    assert task["root"] == str(tmp_path / "data" / "shakespeare_modern")
    tok = Tokenizer.char_level(set("".join(b.decode() for b in served.values())) | set(task["template"]))
    dm = TaskDataModule(**task, tokenizer=tok, block_size=256)
    dm.setup()
    assert sorted(asked) == sorted(served) and len(dm.rows["train"]) == 300 and len(dm.rows["valid"]) == 24
    for name in ("train.modern", "valid.original"):
        assert (tmp_path / "data" / "shakespeare_modern" / name).read_bytes() == (pairs_dir / name).read_bytes()

    def offline(*a, **k):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setenv("GPT_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(GPTError) as e:
        TaskDataModule(**compose_task("shakespeare_modern"), tokenizer=tok, block_size=256).setup()
    assert str(tmp_path / "empty" / "shakespeare_modern" / "train.modern") in str(e.value)
    assert "GPT_DATA_DIR" in str(e.value) and "\n" not in str(e.value)


def test_offline_and_missing_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT_DATA_DIR", str(tmp_path))

    def offline(*a, **k):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(GPTError) as e:
        resolve_files(
            relpath="tinyshakespeare/input.txt",
            url="https://example/input.txt",
            sha256=SHAKESPEARE_SHA,
            name="shakespeare_char",
        )
    msg = str(e.value)
    assert str(tmp_path / "tinyshakespeare" / "input.txt") in msg and "GPT_DATA_DIR" in msg


def test_wrong_file_for_a_named_dataset_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT_DATA_DIR", str(tmp_path))
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_text("not shakespeare")
    with pytest.raises(GPTError, match="not the expected"):
        resolve_files(relpath="tinyshakespeare/input.txt", sha256=SHAKESPEARE_SHA, name="shakespeare_char")


@pytest.mark.parametrize(
    "content, needle",
    [(b"", "empty"), (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"), (b"caf\xe9 au lait\n", "not UTF-8")],
)
def test_bad_corpus_files(tmp_path, content, needle):
    f = tmp_path / "corpus.txt"
    f.write_bytes(content)
    with pytest.raises(GPTError, match=needle):
        check_text_files([f])


def test_no_file_matches(tmp_path):
    with pytest.raises(GPTError, match="no corpus file matches"):
        resolve_files(path=str(tmp_path / "nope*.txt"))


# -- the token store ---------------------------------------------------------------------------------


def test_token_store_matches_the_text_and_is_cached(shakespeare, tmp_path):
    store = prepare_corpus(TextSource(files=[shakespeare]), tmp_path, "sc", tokenizer="char")
    text = shakespeare.read_text()
    n = len(text)
    assert store.meta["n_tokens"] == n == 53_426  # tests/fixtures/tinyshakespeare.txt: ASCII, a token per byte
    train, val = store.tokens("train"), store.tokens("val")
    assert train.dtype == np.uint16 and len(train) == int(n * 0.9) and len(train) + len(val) == n
    tok = store.tokenizer
    assert tok.decode(train[:200].tolist()) == text[:200]  # the stream is the corpus, in order
    assert tok.decode(val[-100:].tolist()) == text[-100:]
    # a second prepare reuses the files (same directory, not rewritten)
    mtime = (store.root / "tokens.bin").stat().st_mtime_ns
    again = prepare_corpus(TextSource(files=[shakespeare]), tmp_path, "sc", tokenizer="char")
    assert again.root == store.root and (again.root / "tokens.bin").stat().st_mtime_ns == mtime
    # a different tokenizer setting is a different store
    other = prepare_corpus(TextSource(files=[shakespeare]), tmp_path, "sc", tokenizer="char", val_fraction=0.2)
    assert other.root != store.root and other.meta["n_train"] == int(n * 0.8)


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_several_files_are_documents_ended_by_end_of_text_and_a_bom_is_dropped(tmp_path, tokenizer):
    texts = ["First file.\nTwo lines.\n", "\ufeffSecond file, saved with a byte-order mark.\n", "Third.\n"]
    files = [tmp_path / f"{i}.txt" for i in range(3)]
    for f, text in zip(files, texts):
        f.write_text(text, encoding="utf-8")
    store = prepare_corpus(TextSource(files=files), tmp_path / "cache", "docs", tokenizer=tokenizer, vocab_size=300)
    tok = store.tokenizer
    ids = np.concatenate([store.tokens("train"), store.tokens("val")]).tolist()
    docs = [text.removeprefix("\ufeff") for text in texts]
    assert ids == [i for doc in docs for i in tok.encode(doc) + [tok.eos_id]]  # each file ends with EOS
    assert tok.decode(ids, skip_special_tokens=False) == "".join(doc + EOS for doc in docs)
    if tokenizer == "char":  # neither the mark nor the characters of "<|endoftext|>" became text tokens
        assert tok.vocab_size == len(set("".join(docs))) + 2
    single = prepare_corpus(
        TextSource(files=files[1:2]), tmp_path / "cache", "one", tokenizer=tokenizer, vocab_size=300
    )
    assert single.tokenizer.decode(single.tokens("train").tolist() + single.tokens("val").tolist()) == docs[1]


def test_characters_a_fixed_vocabulary_lacks_are_counted_and_reported(tmp_path, caplog):
    """data.tokenizer=file with a char tokenizer from another corpus: the unseen characters train as <|unk|>;
    the run says how many and which (on every run, cached store or not)."""
    Tokenizer.char_level("abc \n").save(tmp_path)
    corpus = tmp_path / "c.txt"
    corpus.write_text("abc cab\nbéa ñ\n", encoding="utf-8")
    for attempt in range(2):  # built, then reused from the cache
        caplog.clear()
        with caplog.at_level("WARNING", logger="gpt.data"):
            store = prepare_corpus(
                TextSource(files=[corpus]),
                tmp_path / "cache",
                "c",
                tokenizer="file",
                tokenizer_path=str(tmp_path / "tokenizer.json"),
            )
        ids = np.concatenate([store.tokens("train"), store.tokens("val")])
        assert int((ids == store.tokenizer.unk_id).sum()) == store.meta["n_unknown"] == 2
        warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warning) == 1 and "2 of 14 tokens" in warning[0] and "'éñ'" in warning[0], warning
    caplog.clear()
    with caplog.at_level("WARNING", logger="gpt.data"):  # its own vocabulary: nothing unknown, nothing said
        own = prepare_corpus(TextSource(files=[corpus]), tmp_path / "cache", "own", tokenizer="char")
    assert own.meta["n_unknown"] == 0 and not caplog.records


def test_a_vocab_size_the_tokenizer_does_not_use_is_said(tmp_path, caplog):
    corpus = tmp_path / "c.txt"
    corpus.write_text("abc cab\n" * 20)
    with caplog.at_level("WARNING", logger="gpt.data"):  # data=hub (vocab_size 8192) data.tokenizer=char
        store = prepare_corpus(TextSource(files=[corpus]), tmp_path / "cache", "c", tokenizer="char", vocab_size=100)
    assert store.tokenizer.vocab_size == 7  # a, b, c, space, newline + <|endoftext|>, <|unk|>: not 100
    assert any("data.vocab_size=100 is not used" in r.getMessage() for r in caplog.records)


def test_a_hub_corpus_without_a_network_fails_at_once_and_leaves_the_offline_flags_as_they_were(tmp_path, monkeypatch):
    import datasets
    from huggingface_hub import constants

    import gpt.datafiles

    monkeypatch.setattr(
        gpt.datafiles, "hub_reachable", lambda: False
    )  # as on a machine whose DNS finds no huggingface.co
    before = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    with pytest.raises(
        GPTError,
        match="'nobody/no-such-corpus' .split 'train'. is not in the local cache and the hub "
        "cannot be reached from here .*OfflineModeIsEnabled.*use local files with data.path",
    ):
        prepare_corpus(
            TextSource(hub={"name": "nobody/no-such-corpus"}),
            tmp_path / "cache",
            "hub",
            tokenizer="bpe",
            vocab_size=300,
        )
    assert (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE) == before
    assert list((tmp_path / "cache").iterdir()) == []  # no half-built store left


def test_token_dtype_limits():
    assert token_dtype(65) == np.uint16 and token_dtype(70_000) == np.uint32
    with pytest.raises(GPTError, match="uint32"):
        token_dtype(70_000, "uint16")


def test_random_windows_are_deterministic_per_batch_index(tmp_path):
    data = np.arange(1000, dtype=np.uint16)
    path = tmp_path / "t.bin"
    data.tofile(path)
    ds = RandomWindows(path, np.uint16, 0, 1000, block_size=16, batch_size=4, seed=3, start=0, stop=10)
    batches = list(ds)
    assert len(batches) == 10 == len(ds)
    for b in batches:
        assert torch.equal(b["labels"], b["input_ids"] + 1)  # y is x shifted by one (data = arange)
        assert b["input_ids"].shape == (4, 16)
    resumed = list(RandomWindows(path, np.uint16, 0, 1000, 16, 4, seed=3, start=6, stop=10))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches[6:], resumed))
    # data.num_workers=2: the workers share the stream (each batch once, in order), not each replay it
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    assert _starts(loader) == _starts(batches)
    # windows never run past the end of the split
    ds = RandomWindows(path, np.uint16, 0, 17, block_size=16, batch_size=64, seed=0, stop=3)
    assert all(int(b["labels"].max()) == 16 for b in ds)


def _starts(batches):
    return [b["input_ids"][:, 0].tolist() for b in batches]  # data = arange: the first id is the window start


def test_the_global_batch_does_not_depend_on_how_it_is_split(tmp_path):
    """2 ranks x B, 1 rank x B x accumulate 2, and 1 rank x 2B train on the same windows at every step, and
    different ranks (or micro-batches) never read the same slice."""
    path = tmp_path / "t.bin"
    np.arange(60_000, dtype=np.uint16).tofile(path)
    args = (path, np.uint16, 0, 60_000, 16)
    steps = 5
    one = _starts(RandomWindows(*args, batch_size=8, seed=3, stop=steps))
    ranks = [_starts(RandomWindows(*args, batch_size=4, seed=3, rank=r, world_size=2, stop=steps)) for r in (0, 1)]
    accum = _starts(RandomWindows(*args, batch_size=4, seed=3, accumulate=2, stop=2 * steps))
    both = _starts(RandomWindows(*args, batch_size=2, seed=3, rank=1, world_size=2, accumulate=2, stop=2 * steps))
    for s in range(steps):
        assert ranks[0][s] != ranks[1][s]  # each rank reads its own windows
        assert ranks[0][s] + ranks[1][s] == one[s] == accum[2 * s] + accum[2 * s + 1]
        assert both[2 * s] == one[s][2:4] and both[2 * s + 1] == one[s][6:8]  # (micro 0, rank 1), (micro 1, rank 1)
    # resuming rank 1 at step 3 continues its own stream
    resumed = _starts(RandomWindows(*args, batch_size=4, seed=3, rank=1, world_size=2, start=3, stop=steps))
    assert resumed == ranks[1][3:]
    with pytest.raises(ValueError, match="rank"):
        RandomWindows(*args, batch_size=4, seed=3, rank=2, world_size=2)


def test_fixed_windows_are_the_same_every_time():
    tokens = np.arange(500, dtype=np.uint16)
    a, b = FixedWindows(tokens, 8, 4, 5, seed=1), FixedWindows(tokens, 8, 4, 5, seed=1)
    assert len(a) == 5 and all(torch.equal(a[i]["input_ids"], b[i]["input_ids"]) for i in range(5))


def test_corpus_shorter_than_one_block(tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("To be, or not to be: that is the question.\n" * 2)
    dm = TextDataModule(name="short", path=str(f), block_size=64, batch_size=2, cache_dir=str(tmp_path / "c"))
    with pytest.raises(GPTError, match="too short"):
        dm.prepare_data()


@pytest.mark.data
def test_datamodule_on_the_real_corpus(shakespeare_full, tmp_path):
    dm = TextDataModule(
        name="sc", path=str(shakespeare_full), block_size=32, batch_size=5, eval_batches=3, cache_dir=str(tmp_path)
    )
    dm.setup("fit")
    assert dm.tokenizer.vocab_size == 65 + 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (5, 32) and batch["input_ids"].dtype == torch.int64
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    assert len(dm.val_dataloader()) == 3
    assert json.loads((dm.store.root / "meta.json").read_text())["tokenizer_kind"] == "char"


PREPARE_SCRIPT = """
import json, random, resource, sys
from pathlib import Path
from gpt.data import TextSource, prepare_corpus

def generate(path, n_bytes, lines):  # shuffled lines of the real corpus: realistic text, any size
    rng = random.Random(0)
    with open(path, "w") as f:
        written = 0
        while written < n_bytes:
            chunk = "".join(rng.choices(lines, k=2000))
            f.write(chunk)
            written += len(chunk)

lines = Path(sys.argv[1]).read_text().splitlines(keepends=True)
out = Path(sys.argv[2])
generate(out / "warmup.txt", 500_000, lines)
generate(out / "big.txt", int(sys.argv[3]), lines)
del lines
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
# the warm-up goes through the same code first (imports, datasets' readers, the tokenizer's buffers)
prepare_corpus(TextSource(files=[out / "warmup.txt"]), out / "cache", "warmup")
before = peak()
store = prepare_corpus(TextSource(files=[out / "big.txt"]), out / "cache", "big")
print(json.dumps({"growth": peak() - before, "n_tokens": store.meta["n_tokens"],
                  "bytes": (out / "big.txt").stat().st_size}))
"""


@pytest.mark.slow
def test_preparing_a_corpus_takes_bounded_memory(shakespeare, tmp_path):
    """The token store is built in a streaming pass: preparing 6 MB of text (6M tokens) grows the process's
    peak memory by less than the corpus's tokens would take as int64 (8 bytes each) - any version that held the
    text's token ids (a list of ints: 8+ bytes per token) or its encodings would be far above that."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", PREPARE_SCRIPT, str(shakespeare), str(tmp_path), "6000000"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["n_tokens"] == result["bytes"] >= 6_000_000  # char-level: a token per character
    assert result["growth"] < 8 * result["n_tokens"], result
