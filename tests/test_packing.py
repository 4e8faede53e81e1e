"""task.packing=true: several examples in one row, attention that cannot cross an example's boundary,
positions restarting per example: every example's loss is the one it has alone."""

import string

import torch
import torch.nn.functional as F

from gpt.batches import pack_examples, pad_batch
from gpt.config import GPTConfig
from gpt.model import GPT
from gpt.tasks import TaskDataModule
from gpt.tokenizer import Tokenizer


def per_token_losses(model, batch):
    extra = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    logits = model(batch["input_ids"], **extra).logits
    return F.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=-100, reduction="none")


def test_packed_rows_give_each_example_its_own_loss(tmp_path):
    torch.manual_seed(0)
    words = [
        "".join(string.ascii_lowercase[int(c)] for c in torch.randint(0, 26, (int(n),)))
        for n in torch.randint(1, 20, (60,))
    ]
    (tmp_path / "src.txt").write_text("\n".join(words[:30]) + "\n")
    (tmp_path / "tgt.txt").write_text("\n".join(words[30:]) + "\n")
    tok = Tokenizer.char_level(string.ascii_lowercase + ":\n ")
    task = TaskDataModule(
        name="t",
        format="parallel",
        template="q: {input}\n",
        tokenizer=tok,
        block_size=128,
        batch_size=4,
        train=[str(tmp_path / "src.txt"), str(tmp_path / "tgt.txt")],
        valid=[str(tmp_path / "src.txt"), str(tmp_path / "tgt.txt")],
        packing=True,
    )
    task.prepare_data()
    examples, rows = task.data["valid"], task.data["train"]  # the same rows: valid unpacked, train packed
    assert sum(len(r["segments"]) for r in rows) == len(examples) and len(rows) <= len(examples) / 3
    assert all(r["length"] <= 128 and len(r["input_ids"]) == r["length"] == sum(r["segments"]) for r in rows)
    model = GPT(GPTConfig(block_size=128, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32)).eval()
    alone = {}
    with torch.no_grad():
        for e in examples:
            loss = per_token_losses(model, pad_batch([e], tok.eos_id))[0]
            alone[tuple(e["input_ids"])] = loss[torch.tensor(e["labels"]) != -100]
        batch = pad_batch(rows[:4], tok.eos_id)  # rows of different lengths: padding after them too
        assert batch["attention_mask"].shape == (4, 1, batch["input_ids"].size(1), batch["input_ids"].size(1))
        packed = per_token_losses(model, batch)
    checked = 0
    for b, row in enumerate(rows[:4]):
        start = 0
        for n in row["segments"]:
            ids, labels = row["input_ids"][start : start + n], torch.tensor(row["labels"][start : start + n])
            got = packed[b, start : start + n][labels != -100]
            assert (got - alone[tuple(ids)]).abs().max() <= 1e-5
            start, checked = start + n, checked + 1
    assert checked > 4
    # through the model's own loss too: a packed batch's mean loss is the token-weighted mean of its examples
    with torch.no_grad():
        loss = model(
            batch["input_ids"],
            batch["labels"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).loss
    want = torch.cat(
        [
            alone[tuple(r["input_ids"][sum(r["segments"][:k]) : sum(r["segments"][: k + 1])])]
            for r in rows[:4]
            for k in range(len(r["segments"]))
        ]
    ).mean()
    assert abs(float(loss) - float(want)) <= 1e-5


def test_packing_fills_rows_longest_first():
    examples = [{"input_ids": [1] * n, "labels": [1] * n, "length": n} for n in (10, 3, 7, 2, 5, 1)]
    rows = pack_examples(examples, 12)
    assert [r["segments"] for r in rows] == [[10, 1], [7, 2, 3], [5]]
