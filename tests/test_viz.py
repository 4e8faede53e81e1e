"""Pictures: attention heatmaps (what was drawn is the model's attention) and loss curves (what was drawn is
the CSV log)."""

import csv
import math
import random

import matplotlib
import numpy as np
import pytest
import torch
from conftest import assert_user_error, run_cli
from matplotlib.image import imread

from gpt.checkpoint import save_model_dir
from gpt.config import GPTConfig
from gpt.errors import GPTError
from gpt.model import GPT
from gpt.prompts import PromptTemplate, source_span
from gpt.tokenizer import Tokenizer
from gpt.viz import alignment_map, alignment_matrix, attention_heatmap, loss_curve, token_labels

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def model_and_tok():
    torch.manual_seed(0)
    tok = Tokenizer.char_level(TEXT)
    config = GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_embd=32)
    return GPT(config).eval(), tok


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    h, w, _ = imread(path).shape
    assert h > 100 and w > 100


def test_attention_heatmap_draws_causal_softmax_rows(model_and_tok, tmp_path):
    model, tok = model_and_tok
    ids = tok.encode(TEXT)
    T = len(ids)
    grid = attention_heatmap(model, tok, ids, tmp_path / "grid.png", layer=1)
    assert_png(tmp_path / "grid.png")
    assert grid.shape == (4, T, T)  # all heads of the layer
    np.testing.assert_allclose(grid.sum(-1), 1.0, atol=1e-5)  # each query's weights are a distribution
    assert (grid[:, np.triu_indices(T, k=1)[0], np.triu_indices(T, k=1)[1]] == 0).all()  # nothing from the future
    assert (grid[:, np.tril_indices(T)[0], np.tril_indices(T)[1]] > 0).all()
    # one head drawn alone is the same matrix as in the grid, and it is the model's attention for these tokens
    one = attention_heatmap(model, tok, ids, tmp_path / "one.png", layer=-1, head=2)
    assert_png(tmp_path / "one.png")
    assert one.shape == (1, T, T) and np.array_equal(one[0], grid[2])
    with torch.no_grad():
        weights = model(torch.tensor([ids]), need_weights=True).attentions[1][0, 2]
    np.testing.assert_allclose(one[0], weights.numpy(), atol=1e-7)


def test_attention_heatmap_refuses_a_layer_or_head_that_is_not_there(model_and_tok, tmp_path):
    model, tok = model_and_tok
    with pytest.raises(GPTError, match="2 layers"):
        attention_heatmap(model, tok, tok.encode("ROMEO"), tmp_path / "x.png", layer=2)
    with pytest.raises(GPTError, match="4 heads"):
        attention_heatmap(model, tok, tok.encode("ROMEO"), tmp_path / "x.png", head=4)
    assert not (tmp_path / "x.png").exists()


def test_token_labels_are_readable(shakespeare):
    char = Tokenizer.char_level(TEXT)
    assert token_labels(char, char.encode("O:\nBut s")) == ["O", ":", "⏎", "B", "u", "t", "·", "s"]
    lines = shakespeare.read_text().splitlines(keepends=True)[:2000]
    bpe = Tokenizer.train_bpe(iter([lines]), vocab_size=400, show_progress=False)
    text = "ROMEO:\nWhat light through yonder window breaks?"
    labels = token_labels(bpe, bpe.encode(text))
    assert len(labels) < len(text)  # whole BPE pieces, not bytes
    assert "".join(labels) == text.replace("\n", "⏎").replace(" ", "·")  # each piece decoded to its own text
    assert "Ġ" not in "".join(labels)  # no byte-level artefacts


def test_token_labels_spell_out_characters_no_font_can_draw():
    # U+10FFFD is a private-use code point: no installed font has a glyph for it, so matplotlib would draw an
    # empty box; the label names the code point instead. Characters the fonts have stay as they are.
    tok = Tokenizer.char_level("ab\U0010fffdé\n")
    assert token_labels(tok, tok.encode("a\U0010fffdé\n")) == ["a", "U+10FFFD", "é", "⏎"]
    # a font.family that is not installed: matplotlib draws with its fallback font, and so do the labels
    with matplotlib.rc_context({"font.family": ["No Such Font Family"]}):
        assert token_labels(tok, tok.encode("a\U0010fffdé\n")) == ["a", "U+10FFFD", "é", "⏎"]


def write_lightning_csv(path, rows):
    keys = ["epoch", "step", "train/loss", "train/lr", "train/tokens_per_s", "val/loss", "val/ppl"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k, "") for k in keys})


def test_loss_curve_plots_what_the_csv_says(tmp_path):
    rows = []
    for step in range(9, 100, 10):
        rows.append(
            {
                "epoch": 0,
                "step": step,
                "train/loss": 4 * math.exp(-step / 50),
                "train/lr": 1e-3 * (step + 1) / 100,
                "train/tokens_per_s": 1000,
            }
        )
        if step % 50 == 49:
            rows.append({"epoch": 0, "step": step, "val/loss": 4.1 * math.exp(-step / 60), "val/ppl": 1.0})
    write_lightning_csv(tmp_path / "metrics.csv", rows)
    drawn = loss_curve(tmp_path / "metrics.csv", tmp_path / "loss.png")
    assert_png(tmp_path / "loss.png")
    assert drawn["train/loss"] == [(r["step"], pytest.approx(r["train/loss"])) for r in rows if "train/loss" in r]
    assert drawn["val/loss"] == [
        (49, pytest.approx(4.1 * math.exp(-49 / 60))),
        (99, pytest.approx(4.1 * math.exp(-99 / 60))),
    ]
    assert [s for s, _ in drawn["train/lr"]] == list(range(9, 100, 10))


def test_loss_curve_of_a_log_without_losses(tmp_path):
    write_lightning_csv(tmp_path / "metrics.csv", [{"epoch": 0, "step": 0, "train/tokens_per_s": 5}])
    with pytest.raises(GPTError, match="no train/loss or val/loss"):
        loss_curve(tmp_path / "metrics.csv", tmp_path / "loss.png")


def test_sample_py_draws_the_attention_of_prompt_and_completion(model_and_tok, tmp_path):
    model, tok = model_and_tok
    save_model_dir(model, tok, tmp_path / "m")
    png = tmp_path / "attn.png"
    proc = run_cli(
        "sample.py",
        f"ckpt={tmp_path / 'm'}",
        "prompt=ROMEO:",
        "max_new_tokens=10",
        "temperature=0",
        f"attention_map={png}",
        "attention_layer=0",
    )
    assert proc.returncode == 0, proc.stderr
    assert_png(png)
    assert f"16 tokens, layer 0, all heads): {png}" in proc.stderr  # 6 prompt + 10 new tokens
    proc = run_cli("sample.py", f"ckpt={tmp_path / 'm'}", f"attention_map={tmp_path / 'b.png'}", "attention_head=7")
    assert_user_error(proc, "attention_head=7", "4 heads")
    assert not (tmp_path / "b.png").exists()


# -- the alignment map -----------------------------------------------------------------------------------

COPY_TEMPLATE = "Copy: {input}\nOut:\n"
LETTERS = "abcdefghijkl"


def test_alignment_matrix_takes_the_predicting_queries_and_the_source_columns():
    """By hand: output token j is predicted at the query before it (prompt_len - 1 + j); the columns are the
    source positions; layers and heads are averaged, or one of each is taken."""
    g = torch.Generator().manual_seed(0)
    T, P, source, rows = 12, 7, range(2, 5), 4
    attentions = [torch.rand(3, T, T, generator=g) for _ in range(2)]  # 2 layers, 3 heads
    mean = alignment_matrix(attentions, P, rows, source, layer=None, head=None)
    one = alignment_matrix(attentions, P, rows, source, layer=-1, head=2)
    assert mean.shape == one.shape == (rows, len(source))
    for j in range(rows):
        for c, s in enumerate(source):
            cells = [float(attentions[la][h, P - 1 + j, s]) for la in range(2) for h in range(3)]
            assert mean[j, c] == pytest.approx(sum(cells) / 6, abs=1e-6)
            assert one[j, c] == pytest.approx(float(attentions[1][2, P - 1 + j, s]), abs=1e-7)


def test_source_span_is_where_the_template_puts_the_input():
    template = PromptTemplate("Modern: {input}\nShakespeare:\n", "{instruction}\n")
    wrap = lambda text: template(input=text)  # noqa: E731
    assert source_span(wrap, "are") == (8, 11)  # not the "are" inside "Shakespeare"
    assert wrap("are")[8:11] == "are"
    assert source_span(wrap, "") is None  # the template without input: no place for it
    assert source_span(lambda text: text, "ROMEO:") == (0, 6)  # no template: the whole prompt


def copy_examples(tok, words):
    """Training examples of the copy task, as fine-tuning builds them: prompt + word + EOS, loss on the answer."""
    xs, ys = [], []
    for word in words:
        p, r = tok.encode(COPY_TEMPLATE.format(input=word)), tok.encode(word) + [tok.eos_id]
        xs.append(p + r[:-1])
        ys.append([-100] * (len(p) - 1) + r)
    return torch.tensor(xs), torch.tensor(ys)


@pytest.fixture(scope="module")
def copier():
    """A one-layer model trained until it copies 6 distinct letters: its one attention layer is the only way from
    a source letter to the output, so the letter it writes must be the one it attends to. (~50-300 steps for any
    seed tried, 1-3 s.)"""
    tok = Tokenizer.char_level(LETTERS + COPY_TEMPLATE)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=48, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=128))
    rng = random.Random(0)
    held_out = copy_examples(tok, ["".join(rng.sample(LETTERS, 6)) for _ in range(64)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: a second thread only waits on a shared CPU
    try:
        for step in range(1000):
            x, y = copy_examples(tok, ["".join(rng.sample(LETTERS, 6)) for _ in range(32)])
            loss = model(x, y).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 25 == 24:
                with torch.no_grad():
                    x, y = held_out
                    if ((model(x).logits.argmax(-1) == y) | (y == -100)).all():
                        break
    finally:
        torch.set_num_threads(threads)
    return model.eval(), tok


def test_a_model_that_copies_aligns_each_output_letter_with_its_source_letter(copier, tmp_path):
    from gpt.completions import generate_batch

    model, tok = copier
    rng = random.Random(1)
    words = ["".join(rng.sample(LETTERS, 6)) for _ in range(8)]
    prompts = [COPY_TEMPLATE.format(input=w) for w in words]
    outputs = generate_batch(model, tok, prompts, max_new_tokens=10, temperature=0.0)
    assert sum(o == w for o, w in zip(outputs, words)) >= 7  # it copies
    wrap = lambda text: COPY_TEMPLATE.format(input=text)  # noqa: E731
    examples = [(p, w, source_span(wrap, w)) for p, w in zip(prompts, words)]
    maps = alignment_map(model, tok, examples[:4], tmp_path / "align.png", layer=-1, head=None)
    assert_png(tmp_path / "align.png")
    assert [m.shape for m in maps] == [(7, 6)] * 4  # 6 letters + <|endoftext|> x the 6 source letters
    maps += alignment_map(model, tok, examples[4:], tmp_path / "more.png", layer=None, head=None)
    diagonal = [m[j].argmax() == j for m in maps for j in range(6)]  # (the end row has no letter of its own)
    assert sum(diagonal) >= 0.9 * len(diagonal), [m[:6].argmax(1) for m in maps]
    # what is drawn is the model's attention: the last prompt token and the letters, against the source letters
    p, w = prompts[0], words[0]
    with torch.no_grad():
        weights = model(torch.tensor([tok.encode(p + w)]), need_weights=True).attentions[0][0].mean(0)
    np.testing.assert_allclose(maps[0][:6], weights[len(p) - 1 : len(p) + 5, 6:12].numpy(), atol=1e-6)
    with pytest.raises(GPTError, match="alignment_layer=1 but the model has 1 layers"):
        alignment_map(model, tok, examples[:1], tmp_path / "x.png", layer=1, head=None)
    assert not (tmp_path / "x.png").exists()


def test_sample_py_draws_the_alignment_of_a_templated_prompt(copier, tmp_path):
    model, tok = copier
    save_model_dir(model, tok, tmp_path / "m")
    png = tmp_path / "align.png"
    args = (
        "sample.py",
        f"ckpt={tmp_path / 'm'}",
        'template="Copy: {input}\\nOut:\\n"',
        "prompt=fadkbl",
        "temperature=0",
    )
    proc = run_cli(*args, "max_new_tokens=10", f"alignment_map={png}", "alignment_layer=null")
    assert proc.returncode == 0, proc.stderr
    assert_png(png)
    assert "x 6 source tokens, the input line in the template): " in proc.stderr  # the letters, not "Copy: "
    assert_user_error(
        run_cli(*args, f"alignment_map={tmp_path / 'b.png'}", "alignment_head=2"), "alignment_head=2", "2 heads"
    )
    assert_user_error(run_cli(*args, f"alignment_map={tmp_path / 'b.txt'}"), "alignment_map=", "image type")
    assert not (tmp_path / "b.png").exists()
