"""LoRA fine-tuning: task data (masking, padding, truncation, bad rows), PEFT adapters (merge, base check,
reload in a fresh process), evaluation against sacrebleu, and finetune.py / sample.py end to end."""

import json
import re
import string
from pathlib import Path

import pytest
import sacrebleu
import torch
import torch.nn.functional as F
from conftest import ROOT, assert_user_error, run_cli
from faults import assert_resumed_run_matches, kill_then_resume
from peft import PeftModel
from safetensors.torch import load_file, save_file

from gpt.adapter import add_lora, base_record, load_adapter, lora_config, merge, save_adapter_dir
from gpt.batches import encode_example, pad_batch
from gpt.checkpoint import load_model, load_model_dir, read_lightning_ckpt, save_model_dir
from gpt.completions import cut_at_stop, escape, generate_batch
from gpt.config import GPTConfig
from gpt.datafiles import data_dir
from gpt.errors import GPTError
from gpt.evaluate import evaluate_task, score
from gpt.model import GPT
from gpt.prompts import PromptTemplate
from gpt.taskrows import BadRows, read_json_records, read_parallel
from gpt.tasks import TaskDataModule
from gpt.tokenizer import Tokenizer


def read_pairs(root: Path, split: str, n: int) -> tuple[list[str], list[str]]:
    if not (root / f"{split}.modern").is_file():
        pytest.fail(f"{root} is missing: set GPT_DATA_DIR to the folder with shakespeare_modern/")
    src = (root / f"{split}.modern").read_text(encoding="utf-8").splitlines()
    tgt = (root / f"{split}.original").read_text(encoding="utf-8").splitlines()
    return src[:n], tgt[:n]


@pytest.fixture(scope="module")
def task_files(pairs_dir, tmp_path_factory):
    """300 train and 24 valid pairs of the made-up task (tests/pairs.py), as the user's own parallel files."""
    d = tmp_path_factory.mktemp("pairs")
    for split, n in (("train", 300), ("valid", 24)):
        src, tgt = read_pairs(pairs_dir, split, n)
        (d / f"{split}.src").write_text("\n".join(src) + "\n")
        (d / f"{split}.tgt").write_text("\n".join(tgt) + "\n")
    return d


@pytest.fixture(scope="module")
def base_dir(task_files, tmp_path_factory):
    """A tiny randomly initialised GPT with a character tokenizer, exported as a base model directory."""
    chars = set(string.ascii_letters + string.digits + string.punctuation + " \n")  # the templates' too
    for f in task_files.iterdir():
        chars.update(f.read_text())
    tok = Tokenizer.char_level(chars)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=64))
    return save_model_dir(model, tok, tmp_path_factory.mktemp("base") / "base")


def task(task_files, tokenizer, block_size=160, **kw) -> TaskDataModule:
    args = dict(
        name="pairs",
        format="parallel",
        template="{input}\n",
        tokenizer=tokenizer,
        block_size=block_size,
        batch_size=8,
        root=str(task_files),
        train=["train.src", "train.tgt"],
        valid=["valid.src", "valid.tgt"],
        metrics=["loss", "bleu", "chrf"],
        stop=["\n"],
        max_new_tokens=24,
    )
    args.update(kw)
    return TaskDataModule(**args)


def randomise_lora(model: PeftModel) -> None:
    """LoRA's B starts at zero (the adapter starts as a no-op); give it weights so merging means something."""
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.05


# -- task data ---------------------------------------------------------------------------------------


def compose_task(name: str, *overrides: str) -> dict:
    """configs/task/<name>.yaml with overrides, as finetune.py composes it (without _target_)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("finetune", overrides=[f"task={name}", *overrides])
    task = OmegaConf.to_container(cfg.task, resolve=True)
    task.pop("_target_")
    return task


def test_labels_mask_the_prompt_and_the_padding_exactly():
    prompts, responses = [[5, 6, 7], [5, 6]], [[8, 9], [10, 11, 12, 13]]
    batch = pad_batch([vars(encode_example(p, r, 0, block_size=32)) for p, r in zip(prompts, responses)], pad_id=0)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        full = p + r + [0]  # + EOS
        n = len(full) - 1
        assert batch["input_ids"][row, :n].tolist() == full[:-1]
        # the token predicted at position i is full[i+1]; it counts iff it is part of the response (or EOS)
        expected = [-100] * (len(p) - 1) + full[len(p) :] + [-100] * (batch["labels"].size(1) - n)
        assert batch["labels"][row].tolist() == expected
    assert batch["n_tokens"] == 5 + 6 == batch["input_ids"].numel() - 1  # prompt + response: tokens/s counts no padding


def test_the_loss_ignores_prompt_positions_and_padding(task_files, base_dir):
    model, tok = load_model_dir(base_dir)
    dm = task(task_files, tok)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    out = model(batch["input_ids"])
    logits = out.logits.detach().requires_grad_(True)
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    loss.backward()
    counted = batch["labels"] != -100
    # nothing flows back from prompt or padding positions; every response position contributes
    assert logits.grad[~counted].abs().max() == 0
    assert (logits.grad[counted].abs().amax(-1) > 0).all()
    assert torch.allclose(model(batch["input_ids"], batch["labels"]).loss, loss)
    # the masked positions are exactly the prompts and the padding: count them from the raw rows
    rows = dm.load_rows()["valid"]
    n_response = sum(
        max(0, min(len(tok.encode(r["output"])) + 1, 160 + 1 - len(tok.encode(dm.prompt(r))))) for r in rows
    )
    assert sum(int((b["labels"] != -100).sum()) for b in dm.val_dataloader()) == n_response


def test_batches_are_padded_to_their_longest_example(task_files, base_dir):
    _, tok = load_model_dir(base_dir)
    dm = task(task_files, tok)
    dm.setup()
    by_len = {}
    for e in dm.data["train"]:
        by_len.setdefault(tuple(e["input_ids"]), len(e["input_ids"]))
    widths, padding = [], 0
    for batch in dm.train_dataloader():
        lengths = [int((row != -100).nonzero().max()) + 1 for row in batch["labels"]]  # last counted position
        assert batch["input_ids"].size(1) == max(lengths)
        widths.append(batch["input_ids"].size(1))
        padding += sum(batch["input_ids"].size(1) - n for n in lengths)
    assert min(widths) < max(widths) <= 160  # not padded to the context
    # grouping by length: far less padding than batches drawn at random would carry
    plain = task(task_files, tok, group_by_length=False)
    plain.setup()
    random_padding = sum(
        b["input_ids"].size(1) * b["input_ids"].size(0) - int((b["labels"] != -100).sum())
        for b in plain.train_dataloader()
    )
    grouped_padding = sum(
        b["input_ids"].size(1) * b["input_ids"].size(0) - int((b["labels"] != -100).sum())
        for b in dm.train_dataloader()
    )
    assert grouped_padding < 0.8 * random_padding


def test_long_examples_are_truncated_and_counted(task_files, base_dir):
    _, tok = load_model_dir(base_dir)
    dm = task(task_files, tok, block_size=48)
    dm.setup()
    rows = dm.load_rows()["train"]
    lengths = [(len(tok.encode(dm.prompt(r))), len(tok.encode(r["output"])) + 1) for r in rows]
    expect_dropped = sum(p >= 49 for p, _ in lengths)  # the prompt alone fills the context: nothing to learn
    expect_truncated = sum(p + r > 49 for p, r in lengths if p < 49)  # kept, with their response cut
    assert dm.stats["train"]["truncated"] == expect_truncated > 0
    assert dm.stats["train"]["dropped"] == expect_dropped > 0
    assert len(dm.data["train"]) == len(rows) - expect_dropped
    assert max(len(e["input_ids"]) for e in dm.data["train"]) == 48
    # scoring: every row is generated for (a dropped one gets an empty response), the loss counts the kept ones
    model = GPT(GPTConfig(block_size=48, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16))
    result = evaluate_task(model, tok, dm, systems=("adapter",), max_new_tokens=2)
    assert result["examples"] == len(dm.load_rows()["valid"]) > result["val_loss_examples"] == len(dm.data["valid"]) > 0


def test_mismatched_parallel_files_name_both_files_and_counts(tmp_path, base_dir):
    (tmp_path / "a.txt").write_text("one\ntwo\nthree\n")
    (tmp_path / "b.txt").write_text("uno\ndos\n")
    proc = run_cli(
        "finetune.py",
        f"base={base_dir}",
        "task=parallel",
        f"task.root={tmp_path}",
        "task.train=[a.txt,b.txt]",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert_user_error(proc, f"{tmp_path / 'a.txt'} has 3 lines", f"{tmp_path / 'b.txt'} has 2")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_malformed_jsonl_names_file_and_line_or_is_skipped_and_counted(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text(
        '{"instruction": "Add", "input": "1 2", "output": "3"}\n'
        '{"instruction": "Add", "input": "2 2" "output": "4"}\n'  # line 2: a missing comma
        '{"instruction": "Say hi", "output": "hi"}\n'  # no input: fine for Alpaca
        '{"instruction": "Add", "input": "5 5"}\n'  # line 4: no output
        '["not", "an", "object"]\n'
    )  # line 5
    fields = {"instruction": "instruction", "input": "input", "output": "output"}
    with pytest.raises(GPTError, match=f"{f}:2: not valid JSON"):
        read_json_records(f, fields, "t", BadRows("error", "t"))
    bad = BadRows("skip", "t")
    rows = read_json_records(f, fields, "t", bad)
    assert rows == [
        {"instruction": "Add", "input": "1 2", "output": "3"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
    ]
    assert [s.split(": ")[0] for s in bad.skipped] == [f"{f}:2", f"{f}:4", f"{f}:5"]
    assert "'output'" in bad.skipped[1]
    assert bad.report("train") == 3


def test_json_array_and_prompt_response_with_own_keys(tmp_path):
    f = tmp_path / "qa.json"
    f.write_text(
        json.dumps(
            [
                {"question": "2+2?", "answer": "4"},
                {"question": "Capital of France?", "answer": "Paris"},
                {"question": "Empty?", "answer": ""},
            ]
        )
    )
    fields = {"input": "question", "output": "answer"}
    with pytest.raises(GPTError, match=f"{f} record 3: missing or empty field 'answer'"):
        read_json_records(f, fields, "qa", BadRows("error", "qa"))
    rows = read_json_records(f, fields, "qa", BadRows("skip", "qa"))
    assert rows == [
        {"instruction": "", "input": "2+2?", "output": "4"},
        {"instruction": "", "input": "Capital of France?", "output": "Paris"},
    ]


def test_task_files_are_read_as_files_count_lines(tmp_path):
    """A UTF-8 byte-order mark is not text, and U+2028 (which json.dumps(ensure_ascii=False) writes raw) or a
    form feed inside a record does not end a JSON Lines line: str.splitlines() would break both records."""
    records = [{"prompt": "a\u2028b", "response": "c\x0cd"}, {"prompt": "e", "response": "f"}]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_bytes(("\ufeff" + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)).encode())
    array = tmp_path / "t.json"
    array.write_bytes(("\ufeff" + json.dumps(records, ensure_ascii=False)).encode())
    fields = {"input": "prompt", "output": "response"}
    for f in (jsonl, array):
        rows = read_json_records(f, fields, "t", BadRows("error", "t"))
        assert [(r["input"], r["output"]) for r in rows] == [("a\u2028b", "c\x0cd"), ("e", "f")], f
    (tmp_path / "s.txt").write_bytes("\ufeffone\r\ntwo\rstill two\n".encode())  # a lone \r ends no line (wc -l: 2)
    (tmp_path / "t.txt").write_bytes("\ufeffuno\ndos\n".encode())
    rows = read_parallel(tmp_path / "s.txt", tmp_path / "t.txt", "t", BadRows("error", "t"))
    assert [(r["input"], r["output"]) for r in rows] == [("one", "uno"), ("two\rstill two", "dos")]


def test_a_parallel_task_reads_the_source_and_target_columns_of_a_hub_dataset(monkeypatch):
    import datasets

    import gpt.taskrows

    def hub(name, config, split, instead):  # what load_dataset returns for a (source, target) dataset
        assert (name, split) == ("someone/pairs", "train")
        return datasets.Dataset.from_dict({"source": ["a b", "c"], "target": ["x", "y"], "id": [1, 2]})

    monkeypatch.setattr(gpt.taskrows, "load_hub_dataset", hub)
    composed = compose_task("parallel", "task.hub.name=someone/pairs", "task.hub.valid_split=train")
    tok = Tokenizer.char_level("abcxy \n")
    rows = TaskDataModule(**{**composed, "tokenizer": tok, "block_size": 32}).load_rows()
    assert (
        [(r["input"], r["output"]) for r in rows["valid"]]
        == [("a b", "x"), ("c", "y")]
        == [(r["input"], r["output"]) for r in rows["train"]]
    )


def test_row_text_the_template_has_no_place_for_is_refused(tmp_path):
    tok = Tokenizer.char_level("abcdefghijklmnopqrstuvwxyz ?:\n")
    rows = tmp_path / "a.jsonl"
    rows.write_text(
        '{"instruction": "say hi", "input": "", "output": "hi"}\n'
        '{"instruction": "add", "input": "two two", "output": "four"}\n'
    )
    task = lambda template, **kw: TaskDataModule(
        name="t",
        format="alpaca",
        template=template,
        tokenizer=tok,  # noqa: E731
        block_size=64,
        train=str(rows),
        valid=str(rows),
        **kw,
    )
    with pytest.raises(
        GPTError,
        match=r"t train: 2 of 2 rows have an \{instruction\} that the prompt template "
        r"'in: \{input\}\\n' leaves out",
    ):
        task("in: {input}\n").prepare_data()  # e.g. an adapter trained on parallel text, scored on Alpaca rows
    task("{instruction}: {input}\n", template_no_input="{instruction}:\n").prepare_data()  # Alpaca's way: all used


def test_scoring_reads_only_the_valid_split(tmp_path):
    tok = Tokenizer.char_level("abcdefghijklmnopqrstuvwxyz0123456789 ?\n")
    one = tmp_path / "one.jsonl"
    one.write_text('{"prompt": "2 2?", "response": "4"}\n{"prompt": "3 3?", "response": "6"}\n')
    task = lambda **kw: TaskDataModule(
        name="t",
        format="prompt_response",
        template="{input}\n",
        tokenizer=tok,  # noqa: E731
        block_size=64,
        valid_only=True,
        **kw,
    )
    dm = task(train=str(tmp_path / "not-there.jsonl"), valid=str(one))  # the train file is never opened
    dm.prepare_data()
    assert set(dm.data) == {"valid"} and len(dm.data["valid"]) == 2
    with pytest.raises(GPTError, match="say what to score: task.valid="):
        task(train=None)
    held_out = task(train=str(one), valid_fraction=0.5).load_rows()  # no valid split: held out of train, as trained
    assert len(held_out["valid"]) == 1


def test_a_task_with_no_training_rows_says_why_and_files_plus_hub_is_refused(tmp_path):
    tok = Tokenizer.char_level("abcdefghijklmnopqrstuvwxyz0123456789 ?")
    task = lambda **kw: TaskDataModule(
        name="t",
        format="prompt_response",
        template="{input}\n",
        tokenizer=tok,  # noqa: E731
        block_size=64,
        **kw,
    )
    one = tmp_path / "one.jsonl"
    one.write_text('{"prompt": "2 2?", "response": "4"}\n')
    with pytest.raises(GPTError, match=r"the train split has no usable rows \(its 1 row\(s\) went to the valid split"):
        task(train=str(one)).load_rows()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "2 2?"}\n{"prompt": "3 3?"}\n')
    with pytest.raises(GPTError, match=r"no usable rows \(all 2 rows were skipped as malformed"):
        task(train=str(bad), on_bad_row="skip").load_rows()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(
        GPTError, match=re.escape(f"no usable rows; read from {empty}: give it rows with 'prompt', 'response'")
    ):
        task(train=str(empty)).load_rows()
    with pytest.raises(GPTError, match="both task.train .files. and task.hub.name=someone/qa give the data; keep one"):
        task(train=str(one), hub={"name": "someone/qa"})
    assert task(train=str(one), valid=str(one)).load_rows()["train"][0]["output"] == "4"


def test_task_characters_a_char_base_lacks_are_said_before_training_and_scored_as_trained(tmp_path, caplog):
    """They train as <|unk|>; the evaluation after training reads them the same way instead of refusing."""
    from gpt.evaluate import generate_responses

    tok = Tokenizer.char_level("abcdefghijklmnopqrstuvwxyz ?\n")
    rows = tmp_path / "qa.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"prompt": p, "response": r}) + "\n"
            for p, r in [("café?", "yes"), ("tea?", "no"), ("naïve?", "sí"), ("milk?", "ok")]
        )
    )
    dm = TaskDataModule(
        name="t",
        format="prompt_response",
        template="{input}\n",
        tokenizer=tok,
        block_size=64,
        train=str(rows),
        valid=str(rows),
    )
    with caplog.at_level("WARNING", logger="gpt.tasks"):
        dm.prepare_data()
    said = [r.getMessage() for r in caplog.records if "never seen" in r.getMessage()]
    assert len(said) == 2 and "2 of 4 examples" in said[0] and "'éíï'" in said[0], said  # café, naïve + sí
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16)).eval()
    prompts = [dm.prompt(r) for r in dm.load_rows()["valid"]]
    with pytest.raises(GPTError, match="never seen"):  # sample.py's prompts stay strict: a typed prompt is checked
        generate_batch(model, tok, prompts, max_new_tokens=3, temperature=0.0)
    assert len(generate_responses(model, tok, prompts, max_new_tokens=3, stops=[], batch_size=4, dtype="float32")) == 4


def test_alpaca_task_through_the_cli_names_the_bad_line(tmp_path, base_dir):
    data = tmp_path / "alpaca.jsonl"
    data.write_text('{"instruction": "Say hi", "input": "", "output": "hi"}\n{"instruction": "Say hi"\n')
    proc = run_cli(
        "finetune.py", f"base={base_dir}", "task=alpaca", f"task.train={data}", f"hydra.run.dir={tmp_path / 'r'}"
    )
    assert_user_error(proc, f"{data}:2", "on_bad_row=skip")


# -- adapters ----------------------------------------------------------------------------------------


def test_a_rank_as_wide_as_the_layer_is_said(caplog):
    def warnings_for(rank):
        caplog.clear()
        with caplog.at_level("WARNING", logger="gpt.adapter"):
            add_lora(
                GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=1, n_head=2, n_embd=32)), lora_config(rank=rank)
            )
        return [r.getMessage() for r in caplog.records]

    assert warnings_for(31) == []  # below the narrowest side (32) of every targeted layer
    assert len(warnings_for(32)) == 1 and "attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj" in warnings_for(32)[0]


def test_lora_targets_map_to_our_module_names(base_dir):
    model, _ = load_model_dir(base_dir)
    peft_model = add_lora(model, lora_config(rank=4, targets=["qkv", "attn_out", "mlp", "lm_head"]))
    wrapped = sorted(n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and n.count("lora_") == 0)
    assert [n.split("model.", 2)[-1] for n in wrapped] == sorted(
        [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
        + ["lm_head"]
    )
    with pytest.raises(GPTError, match="matches no linear layer"):
        add_lora(load_model_dir(base_dir)[0], lora_config(targets=["q_proj"]))


@pytest.mark.parametrize("targets", [["qkv", "attn_out", "mlp"], ["qkv", "lm_head"]])
def test_merged_equals_unmerged_and_exports_standalone(base_dir, tmp_path, targets):
    model, tok = load_model_dir(base_dir)
    peft_model = add_lora(model, lora_config(rank=4, targets=targets)).eval()
    randomise_lora(peft_model)
    x = torch.randint(0, tok.vocab_size, (2, 40))
    with torch.no_grad():
        unmerged = peft_model(x).logits
        with peft_model.disable_adapter():
            base = peft_model(x).logits
        merged_model = merge(peft_model)
        merged = merged_model(x).logits
    assert type(merged_model) is GPT
    assert (unmerged - base).abs().max() > 1e-2  # the adapter does change the output
    assert (merged - unmerged).abs().max() <= 1e-5
    # the merged model is a plain model directory that reloads to the same logits
    reloaded, _ = load_model(save_model_dir(merged_model, tok, tmp_path / "merged"))
    with torch.no_grad():
        assert (reloaded.eval()(x).logits - unmerged).abs().max() <= 1e-5
    # an adapter on the (tied) LM head must not leak into the input embedding
    original, _ = load_model_dir(base_dir)
    assert torch.equal(reloaded.transformer.wte.weight, original.transformer.wte.weight)
    # and the merged model exports to Hugging Face like any other (an untied lm_head when it was adapted)
    from transformers import GPT2LMHeadModel

    from gpt.convert import export_hf

    hf = GPT2LMHeadModel.from_pretrained(str(export_hf(tmp_path / "merged", tmp_path / "hf"))).eval()
    assert hf.config.tie_word_embeddings == ("lm_head" not in targets)
    with torch.no_grad():
        assert (hf(x).logits - unmerged).abs().max() <= 1e-5


def test_lean_autocast_trains_the_same_adapter_and_checkpoints_the_fp32_base(base_dir, tmp_path):
    """LeanAutocastForLoRA: under bf16-mixed the frozen base linears are held in bf16 and PEFT's input casts
    are off while fitting; the losses and the adapter are bit-identical to training without it, a checkpoint
    taken mid-fit holds the fp32 base, and afterwards the fp32 originals and PEFT's casts are back."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from peft.tuners.tuners_utils import BaseTunerLayer

    from gpt.callbacks import LeanAutocastForLoRA
    from gpt.lit import LanguageModel

    data = torch.randint(0, 30, (6, 4, 33), generator=torch.Generator().manual_seed(3))  # ids every test vocab has
    batches = [{"input_ids": b[:, :-1], "labels": b[:, 1:]} for b in data]

    def input_casts(model) -> set:
        return {m.cast_input_dtype_enabled for m in model.modules() if isinstance(m, BaseTunerLayer)}

    class Probe(Callback):
        def __init__(self, ckpt):
            self.losses, self.dtypes, self.casts, self.ckpt = [], set(), set(), ckpt

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(outputs["loss"].item())
            self.dtypes |= {m.weight.dtype for n, m in pl_module.named_modules() if n.endswith("c_fc.base_layer")}
            self.casts |= input_casts(pl_module)
            if batch_idx == 2:  # a checkpoint in the middle of the fit
                trainer.save_checkpoint(self.ckpt)

    def fit(lean: bool):
        model, tok = load_model_dir(base_dir)
        torch.manual_seed(0)  # LoRA's A starts random
        peft_model = add_lora(model, lora_config(rank=4, dropout=0.0, targets=["qkv", "attn_out", "mlp", "lm_head"]))
        before = {n: p.clone() for n, p in peft_model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        probe = Probe(tmp_path / f"lean{lean}.ckpt")
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            precision="bf16-mixed",
            max_steps=6,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[probe] + ([LeanAutocastForLoRA()] if lean else []),
        )
        module = LanguageModel(peft_model, tok, lr=1e-2, warmup_steps=0)
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
        return peft_model, probe, before

    plain, plain_probe, _ = fit(False)
    lean, lean_probe, before = fit(True)
    assert plain_probe.dtypes == {torch.float32} and lean_probe.dtypes == {torch.bfloat16}
    assert plain_probe.casts == {True} and lean_probe.casts == {False} and input_casts(lean) == {True}
    assert lean_probe.losses == plain_probe.losses and len(set(lean_probe.losses)) > 1
    adapters = {n: p for n, p in plain.named_parameters() if p.requires_grad}
    for name, p in lean.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, adapters[name]), name
        else:  # fp32 again and untouched, the tied head/embedding included
            assert p.dtype == torch.float32 and torch.equal(p, before[name]), name
    state = read_lightning_ckpt(tmp_path / "leanTrue.ckpt")["state_dict"]
    base = {k: v for k, v in state.items() if "base_layer" in k}
    assert base and all(torch.equal(v, before[k.removeprefix("model.")]) for k, v in base.items())


def test_adapter_dir_loads_with_peft_and_refuses_another_base(base_dir, tmp_path):
    model, tok = load_model_dir(base_dir)
    peft_model = add_lora(model, lora_config(rank=4)).eval()
    randomise_lora(peft_model)
    adapter = save_adapter_dir(peft_model, tok, tmp_path / "adapter", {"base": base_record(base_dir), "task": {}})
    assert {p.name for p in adapter.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "gpt_adapter.json",
    }
    x = torch.randint(0, tok.vocab_size, (1, 30))
    plain = PeftModel.from_pretrained(load_model_dir(base_dir)[0], str(adapter)).eval()  # PEFT's own loader
    ours, _, record = load_adapter(adapter)
    with torch.no_grad():
        expected = peft_model(x).logits
        assert torch.equal(plain(x).logits, expected) and torch.equal(ours(x).logits, expected)
    assert record["base"]["path"] == str(Path(base_dir).resolve())

    other = GPT(GPTConfig(block_size=160, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=64))
    other_dir = save_model_dir(other, tok, tmp_path / "other")
    with pytest.raises(GPTError, match="belongs to a different base") as e:
        load_adapter(adapter, other_dir)
    assert str(Path(base_dir).resolve()) in str(e.value) and record["base"]["sha256"][:12] in str(e.value)


def _break_weights_file(adapter: Path) -> None:
    (adapter / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes()[:100])


def _drop_first_block(adapter: Path) -> None:
    state = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k: v for k, v in state.items() if ".h.0." not in k}, str(adapter / "adapter_model.safetensors"))


def _other_rank(adapter: Path) -> None:
    state = load_file(str(adapter / "adapter_model.safetensors"))
    save_file(
        {k: (v[:2] if "lora_A" in k else v[:, :2]).contiguous() for k, v in state.items()},
        str(adapter / "adapter_model.safetensors"),
    )


@pytest.mark.parametrize(
    "damage, needle",
    [
        (_break_weights_file, "truncated or corrupt adapter (SafetensorError"),
        (lambda a: (a / "adapter_config.json").write_text("{x"), "truncated or corrupt adapter (JSONDecodeError"),
        (lambda a: (a / "gpt_adapter.json").write_text("[]"), "does not record the adapter's base model"),
        (_drop_first_block, "lacks 2 LoRA tensors"),  # PEFT itself would only warn, and run block 0 bare
        (_other_rank, "truncated or corrupt adapter (RuntimeError"),
    ],
    ids=["truncated weights", "broken adapter_config", "record without base", "missing factors", "other rank"],
)
def test_a_damaged_adapter_directory_is_refused_naming_the_fix(base_dir, tmp_path, damage, needle):
    model, tok = load_model_dir(base_dir)
    peft_model = add_lora(model, lora_config(rank=4, targets=["qkv"]))
    adapter = save_adapter_dir(peft_model, tok, tmp_path / "adapter", {"base": base_record(base_dir), "task": {}})
    load_adapter(adapter)  # whole, it loads
    damage(adapter)
    with pytest.raises(GPTError, match="re-run (finetune.py|the fine-tuning)") as e:
        load_adapter(adapter)
    assert needle in str(e.value)


# -- evaluation --------------------------------------------------------------------------------------


def test_scores_are_sacrebleus():
    hyps = ["the cat sat on the mat .", "thou art a villain", "good morrow , sir"]
    refs = ["the cat sat upon the mat .", "thou art a villain !", "good morrow"]
    got = score(hyps, refs, ["bleu", "chrf", "exact_match"])
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=0.005)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=0.005)
    assert got["exact_match"] == pytest.approx(0.0)
    assert score(["4", " Paris "], ["4", "Paris"], ["exact_match"])["exact_match"] == 100.0


@pytest.mark.data
def test_copy_baseline_on_the_full_valid_split_is_the_published_figure():
    src, tgt = read_pairs(data_dir() / "shakespeare_modern", "valid", 10_000)
    assert len(src) == len(tgt) == 1218
    assert score(src, tgt, ["bleu"])["bleu"] == pytest.approx(16.5, abs=0.05)  # the figure


def test_stop_strings_end_generation_early_with_the_same_text(base_dir):
    model, tok = load_model_dir(base_dir)
    prompts = ["Good morrow", "I am", "What light through yonder window breaks"]
    args = dict(max_new_tokens=40, temperature=0.0, batch_size=8)
    full = generate_batch(model.eval(), tok, prompts, **args)
    stopped = generate_batch(model, tok, prompts, stops=[" "], **args)
    assert stopped == [cut_at_stop(t, [" "])[0] for t in full]


# -- end to end through finetune.py and sample.py -----------------------------------------------------


@pytest.fixture(scope="module")
def finetuned(task_files, base_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ft") / "run"
    proc = run_cli(
        "finetune.py",
        f"base={base_dir}",
        "task=parallel",
        f"task.root={task_files}",
        "task.train=[train.src,train.tgt]",
        "task.valid=[valid.src,valid.tgt]",
        "task.batch_size=16",
        "task.max_new_tokens=24",
        "trainer.max_steps=40",
        "trainer.val_check_interval=20",
        "optim.lr=1e-2",
        "optim.warmup_steps=5",
        "lora.rank=8",
        "lora.targets=[qkv,attn_out,mlp,lm_head]",
        "merge=true",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
        # fp32 (the CPU default may be bf16-mixed): this 40-step toy adapter then answers with text,
        # not only EOS, so reproducing its outputs below compares something
        "trainer.precision=32-true",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def test_finetune_trains_only_the_adapter_and_reports_it(finetuned, base_dir, task_files):
    run_dir, proc = finetuned
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0 < metrics["trainable_params"] < 0.2 * metrics["total_params"]
    assert (
        f"{metrics['trainable_params']:,} trainable of {metrics['total_params']:,} parameters"
        in proc.stdout + proc.stderr
    )
    ev = metrics["eval"]
    assert ev["examples"] == 24 and set(ev) >= {"base", "adapter", "copy"}
    assert (run_dir / "alignments.png").read_bytes()[:4] == b"\x89PNG"  # eval.alignments: the adapter's attention
    assert ev["adapter"]["val_loss"] < ev["base"]["val_loss"] - 0.5  # it learned something
    copied = [(task_files / f"valid.{side}").read_text().splitlines() for side in ("src", "tgt")]
    assert ev["copy"]["bleu"] == pytest.approx(score(*copied, ["bleu"])["bleu"])
    # the base weights are the same after fine-tuning: compare the trained module's frozen tensors
    state = read_lightning_ckpt(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    base, _ = load_model_dir(base_dir)
    frozen = {
        k.replace("model.base_model.model.", "").replace(".base_layer", ""): v
        for k, v in state.items()
        if "lora_" not in k
    }
    for name, tensor in base.state_dict().items():
        assert torch.equal(frozen[name], tensor), name
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)  # while the adapter did train


def test_adapter_reproduces_its_outputs_in_a_fresh_process(finetuned, task_files, tmp_path):
    run_dir, _ = finetuned
    adapter = run_dir / "checkpoints" / "best"
    out = tmp_path / "out.txt"
    proc = run_cli(
        "sample.py",
        f"adapter={adapter}",
        f"input_file={task_files / 'valid.src'}",
        f"output_file={out}",
        "temperature=0",
        "max_new_tokens=24",
        "batch_size=64",
        "dtype=float32",
    )  # what the evaluation generated in (eval.dtype)
    assert proc.returncode == 0, proc.stderr
    expected = (run_dir / "valid.adapter.txt").read_text().splitlines()
    assert [line.strip() for line in out.read_text().splitlines()] == expected
    # What a 40-step toy adapter says greedily depends on the CPU's rounding (it may be an empty line each
    # time), so the same comparison once more with sampled text, which is never all empty: the fresh process
    # draws exactly what this process draws from the adapter with the same seed.
    sampled = tmp_path / "sampled.txt"
    proc = run_cli(
        "sample.py",
        f"adapter={adapter}",
        f"input_file={task_files / 'valid.src'}",
        f"output_file={sampled}",
        "temperature=1.0",
        "top_k=null",
        "seed=7",
        "max_new_tokens=24",
        "batch_size=64",
        "dtype=float32",
    )
    assert proc.returncode == 0, proc.stderr
    model, tok, record = load_adapter(adapter)
    assert record["decoding"] == {"num_beams": 1, "length_penalty": 1.0, "no_repeat_ngram_size": 0, "copy_bonus": 0.0}
    template = PromptTemplate(record["task"]["template"])
    lines = (task_files / "valid.src").read_text().splitlines()
    here = generate_batch(
        model.eval(),
        tok,
        [template(input=line) for line in lines],
        max_new_tokens=24,
        temperature=1.0,
        stops=record["task"]["stop"],
        batch_size=64,
        generator=torch.Generator().manual_seed(7),
    )
    assert sampled.read_text().splitlines() == [escape(text) for text in here]
    assert sum(map(len, here)) > 24


def test_merged_export_matches_the_adapter(finetuned):
    run_dir, _ = finetuned
    adapter, tok, _ = load_adapter(run_dir / "checkpoints" / "best")
    merged, _ = load_model(run_dir / "checkpoints" / "merged")
    x = torch.tensor([tok.encode("I have half a mind to hit you.\n")])
    with torch.no_grad():
        assert (merged.eval()(x).logits - adapter(x).logits).abs().max() <= 1e-5


def test_eval_only_and_an_adapter_on_the_wrong_base(finetuned, tmp_path, task_files):
    run_dir, _ = finetuned
    adapter = run_dir / "checkpoints" / "best"
    wrong = run_dir / "checkpoints" / "merged"  # a valid model directory, but not the adapter's base
    proc = run_cli("sample.py", f"adapter={adapter}", f"ckpt={wrong}", "prompt=Hello")
    assert_user_error(proc, "belongs to a different base", str(wrong))
    # Scoring a held-out file: no train split needed, and the prompts are the adapter's (its recorded template
    # and stop strings), not the task config's: the same figures as the training run's own scoring.
    proc = run_cli(
        "finetune.py",
        "eval_only=true",
        f"adapter={adapter}",
        "task=parallel",
        f"task.root={task_files}",
        "task.valid=[valid.src,valid.tgt]",
        'task.template="Q: {input} A:"',
        "task.stop=[]",
        "task.max_new_tokens=24",
        "trainer.precision=32-true",
        f"hydra.run.dir={tmp_path / 'eval'}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = proc.stdout + proc.stderr
    assert "scoring with the template=" in said and f"run directory: {tmp_path / 'eval'}" in said
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())["eval"]
    first = json.loads((run_dir / "metrics.json").read_text())["eval"]
    for system in ("base", "adapter", "copy"):
        assert again[system].get("val_loss") == first[system].get("val_loss")
        assert again[system]["bleu"] == first[system]["bleu"]
    # merge=true with eval_only folds the existing adapter into its base: the training run's merged model
    proc = run_cli(
        "finetune.py",
        "eval_only=true",
        "merge=true",
        "eval.enabled=false",
        f"adapter={adapter}",
        "task=parallel",
        f"task.root={task_files}",
        "task.train=[train.src,train.tgt]",
        f"hydra.run.dir={tmp_path / 'merge'}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged, trained = (
        load_file(tmp_path / "merge/checkpoints/merged/model.safetensors"),
        load_file(wrong / "model.safetensors"),
    )
    assert merged.keys() == trained.keys() and all(torch.equal(merged[k], trained[k]) for k in merged)
    assert "eval" not in json.loads((tmp_path / "merge" / "metrics.json").read_text())
    assert json.loads((tmp_path / "merge/checkpoints/merged/config.json").read_text())["gpt"]["adapter"] == str(
        adapter.resolve()
    )
    # a mistake in the task is found before anything is written
    proc = run_cli(
        "finetune.py",
        "eval_only=true",
        "merge=true",
        f"adapter={adapter}",
        "task=parallel",
        f"task.root={task_files}",
        "task.valid=[valid.src,missing.tgt]",
        f"hydra.run.dir={tmp_path / 'bad'}",
    )
    assert_user_error(proc, "missing.tgt not found")
    assert not (tmp_path / "bad" / "checkpoints").exists()  # no merged model (the named directory itself stays)


def test_an_adapters_alignment_is_its_merged_models_and_sample_py_draws_it(finetuned, tmp_path):
    from gpt.prompts import source_span
    from gpt.viz import alignment_map

    run_dir, _ = finetuned
    adapter, tok, record = load_adapter(run_dir / "checkpoints" / "best")
    merged, _ = load_model(run_dir / "checkpoints" / "merged")
    template = PromptTemplate(record["task"]["template"])
    line = "I have half a mind to hit you ."
    prompt = template(input=line)
    example = [(prompt, "I have half a mind to hit thee .", source_span(lambda t: template(input=t), line))]
    args = dict(layer=None, head=None)
    drawn = alignment_map(adapter.eval(), tok, example, tmp_path / "adapter.png", **args)[0]
    assert drawn.shape == (len("I have half a mind to hit thee .") + 1, len(line))  # char tokens (+ the end row)
    assert abs(drawn - alignment_map(merged.eval(), tok, example, tmp_path / "merged.png", **args)[0]).max() < 1e-5
    with adapter.disable_adapter():  # and the adapter's attention is not the base's
        assert abs(drawn - alignment_map(adapter, tok, example, tmp_path / "base.png", **args)[0]).max() > 1e-3
    png = tmp_path / "align.png"
    proc = run_cli(
        "sample.py",
        f"adapter={run_dir / 'checkpoints' / 'best'}",
        f"prompt={line}",
        "temperature=0",
        "max_new_tokens=24",
        f"alignment_map={png}",
        f"attention_map={tmp_path / 'attn.png'}",  # drawn after beam search (or MBR) too, not only after sampling
        "mbr=true",
        "num_beams=2",
    )
    assert proc.returncode == 0, proc.stderr
    assert f"x {len(line)} source tokens, the input line in the template): {png}" in proc.stderr
    assert png.read_bytes()[:4] == (tmp_path / "attn.png").read_bytes()[:4] == b"\x89PNG"


def test_mbr_scoring_chooses_among_the_beams_the_samples_and_the_source(finetuned, task_files, tmp_path):
    """eval.mbr=true: the scored outputs are gpt.mbr's choices among the candidates decoded here, with the run's
    seed; the training run scored without MBR, and that is said."""
    from gpt.mbr import mbr_decode

    run_dir, _ = finetuned
    adapter = run_dir / "checkpoints" / "best"
    proc = run_cli(
        "finetune.py",
        "eval_only=true",
        f"adapter={adapter}",
        "task=parallel",
        f"task.root={task_files}",
        "task.valid=[valid.src,valid.tgt]",
        "task.max_new_tokens=24",
        "eval.max_examples=4",
        "eval.num_beams=2",
        "eval.mbr=true",
        "eval.mbr_samples=2",
        "eval.mbr_utility=bleu",
        "eval.alignments=2",
        "trainer.precision=32-true",
        f"hydra.run.dir={tmp_path / 'mbr'}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    ev = json.loads((tmp_path / "mbr" / "metrics.json").read_text())["eval"]
    lines = (task_files / "valid.src").read_text().splitlines()[:4]
    model, tok, record = load_adapter(adapter)
    template = PromptTemplate(record["task"]["template"])
    expected = mbr_decode(
        model.eval(),
        tok,
        [template(input=line) for line in lines],
        sources=lines,
        num_beams=2,
        samples=2,
        include_source=True,
        utility="bleu",
        temperature=1.0,
        generator=torch.Generator().manual_seed(1337),  # finetune.yaml's seed
        max_new_tokens=24,
        stops=record["task"]["stop"],
        batch_size=64,
        strict=False,
    )
    scored = (tmp_path / "mbr" / "valid.adapter.txt").read_text().splitlines()
    assert scored == [text.strip() for text in expected]
    assert ev["adapter"]["mbr_chose_source"] == sum(s == line for s, line in zip(scored, lines))
    assert (
        "now eval.num_beams=2, eval.length_penalty=1.0, eval.no_repeat_ngram_size=0, eval.copy_bonus=0.0, eval.mbr=True"
        in (tmp_path / "mbr" / "finetune.log").read_text()
    )
    assert (tmp_path / "mbr" / "alignments.png").read_bytes()[:4] == b"\x89PNG"


def test_a_resume_with_other_lora_settings_or_another_base_is_refused(finetuned, task_files, base_dir, tmp_path):
    """The checkpoint holds LoRA factors of its rank and the base they were trained on: a resume with another
    rank (before: a page of state_dict shape errors) or on another base (before: accepted, and the adapter
    recorded the new base) is refused in one line, before anything is written."""
    run_dir, _ = finetuned
    resume = (
        "finetune.py",
        "task=parallel",
        f"task.root={task_files}",
        "task.train=[train.src,train.tgt]",
        "task.valid=[valid.src,valid.tgt]",
        "trainer.max_steps=60",
        "optim.lr=1e-2",
        "optim.warmup_steps=5",
        "lora.targets=[qkv,attn_out,mlp,lm_head]",
        f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
    )
    proc = run_cli(*resume, f"base={base_dir}", "lora.rank=4", f"hydra.run.dir={tmp_path / 'rank'}")
    assert_user_error(proc, "lora.rank=8, this run has 4", "resume with the settings")
    proc = run_cli(
        *resume, "lora.rank=8", f"base={run_dir / 'checkpoints' / 'merged'}", f"hydra.run.dir={tmp_path / 'base'}"
    )
    assert_user_error(proc, "the checkpoint fine-tuned the base", "resume with base=")
    assert not (tmp_path / "rank" / "checkpoints").exists() and not (tmp_path / "base" / "checkpoints").exists()


def test_killed_finetuning_resumes_exactly_where_it_stopped(task_files, base_dir, tmp_path):
    """SIGKILL in the middle of writing the step-30 checkpoint, resume with ckpt_path=last: the same losses,
    step by step, and the same best adapter as a run never stopped (mid-epoch and across epochs: 19 batches
    an epoch)."""
    args = [
        f"base={base_dir}",
        "task=parallel",
        f"task.root={task_files}",
        "task.train=[train.src,train.tgt]",
        "task.valid=[valid.src,valid.tgt]",
        "task.batch_size=16",
        "trainer.max_steps=40",
        "trainer.val_check_interval=10",
        "trainer.log_every_n_steps=1",
        "optim.warmup_steps=5",
        "lora.rank=4",
        "lora.dropout=0.1",
        "eval.enabled=false",
        "trainer.enable_progress_bar=false",
        "name=ft-resume",
    ]
    ref, killed, resumed = kill_then_resume("finetune.py", args, tmp_path)
    assert_resumed_run_matches(resumed, ref, resumed_at=20, steps=40)
