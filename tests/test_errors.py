"""Every row of the error table (docs/errors.md), through the entry scripts as a user runs them:
one `error:` line naming the problem and the fix, exit status 2, no traceback, and no file that existed
before the call changed by it.
"""

import fnmatch
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, assert_user_error, run_cli, train_config
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from gpt.checkpoint import save_model_dir
from gpt.config import GPTConfig
from gpt.model import GPT
from gpt.pretrain import pretrain
from gpt.tokenizer import EOS, Tokenizer

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
LINES = "".join(f"line {i}\n" for i in range(40))
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
LATIN_1 = "café au lait\n".encode("latin-1")


class Payload:
    """Unpickled without weights_only, this runs os.mkdir(path): code, from a file."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (str(self.path),))


@pytest.fixture(scope="module")
def world(tmp_path_factory, shakespeare):
    """What the mistakes are made against: an exported model (context 32) and a finished training run."""
    root = tmp_path_factory.mktemp("world")
    tok = Tokenizer.char_level(TEXT)
    save_model_dir(
        GPT(GPTConfig(block_size=32, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16)), tok, root / "model"
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        pretrain(
            train_config(
                *TINY,
                f"data.path={shakespeare}",
                "trainer.max_steps=2",
                "trainer.val_check_interval=2",
                "trainer.log_every_n_steps=1",
            ),
            root / "runs" / "tiny" / "done",
        )
    for record in (".hydra/config.yaml", ".hydra/overrides.yaml", "train.log"):  # what train.py also leaves there
        write(root / "runs" / "tiny" / "done" / record, f"# {record} of the finished run\n")
    return root


def write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def train(tmp, *args):
    """train.py with a tiny model, run in tmp/run (on the shipped text unless the case picks its own data)."""
    own_data = any(a.startswith(("data=", "data.path=")) for a in args)
    tiny = [a for a in TINY if not (own_data and a.startswith("data.path="))]
    return ("train.py", *tiny, f"hydra.run.dir={tmp / 'run'}", *args)


def sample(world, *args):
    return ("sample.py", f"ckpt={world / 'model'}", "prompt=ROMEO:", "max_new_tokens=5", *args)


def copy_model(world, tmp) -> Path:
    return Path(shutil.copytree(world / "model", tmp / "model"))


def truncated(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def other_vocab(model: Path) -> Path:
    config = json.loads((model / "config.json").read_text())
    config["vocab_size"] += 13
    (model / "config.json").write_text(json.dumps(config))
    return model


def big_tokenizer(tmp) -> Path:
    vocab = {f"t{i}": i for i in range(70_000)} | {EOS: 70_000}
    HFTokenizer(models.WordLevel(vocab, unk_token=EOS)).save(str(tmp / "big.json"))
    return tmp / "big.json"


def evil_ckpt(tmp) -> Path:
    """A real torch zip archive whose pickle calls Path.touch(tmp/pwned) when unpickled without weights_only."""
    torch.save({"state_dict": {}, "gpt": Payload(tmp / "pwned")}, tmp / "evil.ckpt", pickle_protocol=2)
    return tmp / "evil.ckpt"


def nan_model(world, tmp) -> Path:
    model = copy_model(world, tmp)
    weights = {k: torch.full_like(v, float("nan")) for k, v in load_file(model / "model.safetensors").items()}
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    return model


def hf_dir(tmp) -> Path:
    """What save_pretrained writes for a GPT-2 (the config's start; the weights are not read)."""
    write(tmp / "hf" / "model.safetensors", b"x")
    return write(
        tmp / "hf" / "config.json",
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 16}),
    ).parent


def lora_ckpt(world, tmp) -> Path:
    """What finetune.py's best.ckpt holds: the base model's weights under PEFT's names, plus LoRA factors."""
    ckpt = torch.load(world / "runs/tiny/done/checkpoints/last.ckpt", weights_only=True)
    state = {k.replace("model.", "model.base_model.model.", 1): v for k, v in ckpt["state_dict"].items()}
    state["model.base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight"] = torch.zeros(8, 64)
    torch.save({**ckpt, "state_dict": state}, tmp / "best.ckpt")
    return tmp / "best.ckpt"


# (README row, id, how to make the mistake: f(world, tmp) -> (script, *args) or (script, *args, {env}), needles)
CASES = [
    (
        "unknown config key",
        "typo'd key",
        lambda w, t: train(t, "model.n_layr=3"),
        ["unknown config key 'model.n_layr'"],
    ),
    ("unknown choice", "no such preset", lambda w, t: train(t, "model=gpt5"), ["model/gpt5", "gpt2-medium"]),
    (
        "impossible model config",
        "impossible shape",
        lambda w, t: train(t, "model.n_embd=100", "model.n_head=3"),
        ["divisible by n_head"],
    ),
    (
        "trainer config:",
        "bad trainer value",
        lambda w, t: train(t, "trainer.precision=fp13"),
        ["Precision 'fp13' is invalid", "trainer.*"],
    ),
    (
        "cannot create hydra.run.dir",
        "unwritable run dir",
        lambda w, t: (*train(t), "hydra.run.dir=/proc/nope/run"),
        ["/proc/nope/run", "write to"],
    ),
    (
        "downloading ... failed",
        "missing dataset offline",
        lambda w, t: (
            *train(t, "data.path=null", "data.url=http://127.0.0.1:9/input.txt"),
            {"GPT_DATA_DIR": str(t / "nothing")},
        ),
        ["tinyshakespeare/input.txt", "GPT_DATA_DIR"],
    ),
    (
        "the corpus is empty",
        "empty corpus",
        lambda w, t: train(t, "data=text", f"data.path={write(t / 'c.txt', '')}"),
        ["empty"],
    ),
    (
        "looks binary",
        "binary corpus",
        lambda w, t: train(t, "data=text", f"data.path={write(t / 'c.png', PNG)}"),
        ["c.png looks binary"],
    ),
    (
        "is not UTF-8 text",
        "latin-1 corpus",
        lambda w, t: train(t, "data=text", f"data.path={write(t / 'c.txt', LATIN_1)}"),
        ["not UTF-8", "offset 3", "iconv"],
    ),
    (
        "the corpus is too short",
        "corpus shorter than a block",
        lambda w, t: train(t, "data=text", f"data.path={write(t / 'c.txt', 'Too short.')}"),
        ["too short", "block_size"],
    ),
    (
        "more than uint16 can hold",
        "vocab too big for the token dtype",
        lambda w, t: train(
            t,
            "data=text",
            f"data.path={write(t / 'c.txt', 't1 t2 ' * 50)}",
            "data.tokenizer=file",
            f"data.tokenizer_path={big_tokenizer(t)}",
            "data.dtype=uint16",
        ),
        ["70001 tokens", "data.dtype=uint32"],
    ),
    (
        "data.tokenizer_path=X does not exist",
        "a tokenizer file that is not there",
        lambda w, t: train(t, "data.tokenizer=file", f"data.tokenizer_path={t / 'nope.json'}"),
        ["nope.json does not exist", "tokenizer.json"],
    ),
    (
        "data.tokenizer_path=X does not exist",
        "a folder without a tokenizer.json as the tokenizer",
        lambda w, t: train(
            t, "data.tokenizer=file", f"data.tokenizer_path={write(t / 'notes' / 'readme.txt', 'hi').parent}"
        ),
        ["notes is a directory without a tokenizer.json", "checkpoints/best"],
    ),
    (
        "non-finite loss",
        "NaN loss (raised inside Lightning)",
        lambda w, t: (
            "tests/faults.py",
            *train(t, "trainer.max_steps=6", "trainer.val_check_interval=2"),
            {"GPT_FAULT": "nan@4"},
        ),
        ["at step 4", "last.ckpt", "optim.lr", "on_nan=skip"],
    ),
    (
        "the checkpoint was trained with",
        "resume with another vocabulary",
        lambda w, t: train(
            t,
            f"ckpt_path={w / 'runs/tiny/done/checkpoints/last.ckpt'}",
            "data=text",
            f"data.path={write(t / 'c.txt', TEXT * 20)}",
        ),
        ["model.vocab_size=61", "resume with the settings"],
    ),
    (
        "the checkpoint was trained with",
        "resume with another learning rate",
        lambda w, t: train(
            t, f"ckpt_path={w / 'runs/tiny/done/checkpoints/last.ckpt'}", "trainer.max_steps=4", "optim.lr=0.01"
        ),
        ["optim.lr=0.0006, this run has 0.01", "resume with the settings"],
    ),
    (
        "cannot be loaded safely",
        "resume from a pickle that carries code",
        lambda w, t: train(t, f"ckpt_path={evil_ckpt(t)}"),
        ["evil.ckpt cannot be loaded safely (UnpicklingError: Trying to load unsupported GLOBAL posix.mkdir"],
    ),
    (
        "cannot be loaded safely",
        "sample from a pickle that carries code",
        lambda w, t: ("sample.py", f"ckpt={evil_ckpt(t)}"),
        ["evil.ckpt cannot be loaded safely (UnpicklingError: Trying to load unsupported GLOBAL posix.mkdir"],
    ),
    (
        "is not a whole checkpoint",
        "resume from a truncated .ckpt",
        lambda w, t: train(
            t, f"ckpt_path={truncated(Path(shutil.copy(w / 'runs/tiny/done/checkpoints/last.ckpt', t)))}"
        ),
        ["not a whole checkpoint"],
    ),
    (
        "no earlier run",
        "ckpt_path=last with nothing to resume",
        lambda w, t: (*train(t, "ckpt_path=last"), f"hydra.run.dir={t / 'fresh' / 'run'}"),
        ["no earlier run"],
    ),
    (
        "already holds a run",
        "a second run into a used directory",
        lambda w, t: (*train(t), f"hydra.run.dir={w / 'runs/tiny/done'}"),
        ["already holds a run", "ckpt_path="],
    ),
    (
        "prompt is N tokens",
        "prompt longer than the context",
        lambda w, t: sample(w, "prompt=" + "a" * 40),
        ["40 tokens", "context is 32"],
    ),
    (
        "must be a positive integer",
        "max_new_tokens=0",
        lambda w, t: sample(w, "max_new_tokens=0"),
        ["max_new_tokens must be a positive integer"],
    ),
    (
        "must be a positive integer",
        "temperature<0",
        lambda w, t: sample(w, "temperature=-1"),
        ["temperature must be a number >= 0"],
    ),
    ("must be a positive integer", "top_p>1", lambda w, t: sample(w, "top_p=1.5"), ["top_p must be in (0, 1]"]),
    ("must be a positive integer", "top_p=0", lambda w, t: sample(w, "top_p=0"), ["top_p must be in (0, 1]"]),
    (
        "must be a positive integer",
        "length_penalty=nan",
        lambda w, t: sample(w, "length_penalty=nan", "num_beams=2", "temperature=0"),
        ["length_penalty must be a finite number (got nan)"],
    ),
    (
        "must be a positive integer",
        "log_samples.temperature<0",
        lambda w, t: train(t, "log_samples.temperature=-1"),
        ["log_samples.temperature must be a number >= 0"],
    ),
    (
        "must be a positive integer",
        "eval.dtype=foo, found before training",
        lambda w, t: (
            "finetune.py",
            f"base={w / 'model'}",
            "task=parallel",
            "eval.dtype=foo",
            f"hydra.run.dir={t / 'run'}",
        ),
        ["eval.dtype must be auto, float32, bfloat16 or float16 (got 'foo')"],
    ),
    (
        "must be a positive integer",
        "task.max_new_tokens=0, found before training",
        lambda w, t: (
            "finetune.py",
            f"base={w / 'model'}",
            "task=parallel",
            "task.max_new_tokens=0",
            f"hydra.run.dir={t / 'run'}",
        ),
        ["task.max_new_tokens must be a positive integer (got 0)"],
    ),
    (
        "stop holds an empty string",
        "an empty stop string",
        lambda w, t: sample(w, 'stop=[""]'),
        ["stop holds an empty string", "stop=[]"],
    ),
    (
        "stop holds an empty string",
        "an empty task stop string",
        lambda w, t: (
            "finetune.py",
            f"base={w / 'model'}",
            "task=parallel",
            'task.stop=[""]',
            f"hydra.run.dir={t / 'run'}",
        ),
        ["task.stop holds an empty string"],
    ),
    (
        "log_samples.n must be a whole number >= 0",
        "a negative number of samples",
        lambda w, t: train(t, "log_samples.n=-1"),
        ["log_samples.n must be a whole number >= 0 (got -1)"],
    ),
    (
        "is not a model directory",
        "a directory that is not a model",
        lambda w, t: ("sample.py", f"ckpt={write(t / 'notes' / 'readme.txt', 'hi').parent}"),
        ["not a model directory"],
    ),
    (
        "is truncated or corrupt",
        "truncated safetensors",
        lambda w, t: ("sample.py", f"ckpt={truncated(copy_model(w, t) / 'model.safetensors').parent}"),
        ["model.safetensors is truncated or corrupt"],
    ),
    (
        "has shape",
        "weights of another vocabulary",
        lambda w, t: ("sample.py", f"ckpt={other_vocab(copy_model(w, t))}"),
        ["transformer.wte.weight", "vocabulary"],
    ),
    (
        "cannot read the command-line setting",
        "an unquoted non-ASCII value",
        lambda w, t: sample(w, "prompt=日本語"),
        ["'prompt=日本語'", "'prompt=\"...\"'"],
    ),
    (
        "nothing is left to train",
        "resume a finished run",
        lambda w, t: train(t, f"ckpt_path={w / 'runs/tiny/done/checkpoints/last.ckpt'}", "trainer.max_steps=2"),
        ["already at step 2 and trainer.max_steps=2", "raise trainer.max_steps"],
    ),
    (
        "is a LoRA fine-tuning checkpoint",
        "sample from a fine-tuning .ckpt",
        lambda w, t: ("sample.py", f"ckpt={lora_ckpt(w, t)}"),
        ["LoRA fine-tuning checkpoint", "(sample.py adapter=/", "/best)"],
    ),
    (
        "holds a LoRA adapter, not a whole model",
        "an adapter directory as ckpt=",
        lambda w, t: ("sample.py", f"ckpt={write(t / 'best' / 'adapter_config.json', '{}').parent}"),
        ["sample with adapter=/", "/best (its base"],
    ),
    (
        "trainer.max_steps must be a positive number of steps",
        "a run with no end for the LR schedule",
        lambda w, t: train(t, "trainer.max_steps=-1"),
        ["got -1", "optim.decay_steps"],
    ),
    ("seed must be a whole number from 0 to", "a negative seed", lambda w, t: train(t, "seed=-1"), ["4294967295"]),
    (
        "num_workers must be a whole number >= 0",
        "negative data loader workers",
        lambda w, t: train(t, "data.num_workers=-1"),
        ["data.num_workers"],
    ),
    (
        "is true or false (got",
        "a word for a true/false setting",
        lambda w, t: train(t, "compile=no"),
        ["compile is true or false (got 'no')"],
    ),
    (
        "must be a number (got",
        "a word for a number",
        lambda w, t: train(t, "optim.lr=fast"),
        ["optim.lr must be a number (got 'fast')"],
    ),
    (
        "is not empty (it holds",
        "a run into a directory with other files",
        lambda w, t: (*train(t), f"hydra.run.dir={write(t / 'mine' / 'metrics.json', '{}').parent}"),
        ["is not empty (it holds metrics.json)", "new or empty directory"],
    ),
    (
        "is not empty (it holds",
        "a run into ~/<a folder with other files>",
        lambda w, t: (
            *train(t),
            f"hydra.run.dir=~/{write(t / 'mine2' / 'notes.txt', 'x').parent.name}",
            {"HOME": str(t)},
        ),
        ["mine2 is not empty (it holds notes.txt)"],
    ),
    (
        "cannot read the command-line setting",
        "a bare ~ as a text value (only path settings expand it)",
        lambda w, t: sample(w, "prompt=~"),
        ["'prompt=~'"],
    ),
    (
        "is a pretraining checkpoint",
        "fine-tuning resumed from a pretraining .ckpt",
        lambda w, t: (
            "finetune.py",
            f"base={w / 'runs/tiny/done/checkpoints/best'}",
            "task=parallel",
            f"task.train=[{write(t / 'a.src', LINES)},{write(t / 'a.tgt', LINES)}]",
            "trainer.max_steps=50",
            f"ckpt_path={w / 'runs/tiny/done/checkpoints/last.ckpt'}",
            f"hydra.run.dir={t / 'run'}",
        ),
        ["pretraining checkpoint", "base=<its exported directory>"],
    ),
    (
        "is a directory; name its files with a glob",
        "a folder as data.path",
        lambda w, t: train(t, "data=text", f"data.path={write(t / 'corpus' / 'a.txt', TEXT).parent}"),
        ["/corpus/*.txt'"],
    ),
    (
        "has no setting",
        "a typo in a +key= override",
        lambda w, t: train(t, "+model.n_layr=3"),
        ["GPTConfig has no setting 'n_layr'"],
    ),
    (
        "is longer than the model's context",
        "data.block_size above model.block_size",
        lambda w, t: train(t, "data.block_size=64"),
        ["data.block_size=64", "model.block_size=32"],
    ),
    (
        "is a Hugging Face model directory",
        "a transformers directory as ckpt=",
        lambda w, t: ("sample.py", f"ckpt={hf_dir(t)}", "prompt=hi"),
        ["model_type 'gpt2'", "python -m gpt.convert import-hf"],
    ),
    (
        "is one file of a model directory",
        "ckpt= a file inside a model directory",
        lambda w, t: ("sample.py", f"ckpt={w / 'model' / 'config.json'}"),
        ["point at the directory itself"],
    ),
    (
        "probabilities are NaN or Inf",
        "a model with NaN weights",
        lambda w, t: ("sample.py", f"ckpt={nan_model(w, t)}", "prompt=ROMEO:", "max_new_tokens=5"),
        ["its weights hold NaN/Inf", "checkpoints/best"],
    ),
    (
        "is the input_file: the completions would replace the prompts",
        "batch output over its input",
        lambda w, t: (
            "sample.py",
            f"ckpt={w / 'model'}",
            f"input_file={write(t / 'in.txt', 'ROMEO:')}",
            f"output_file={t / 'x' / '..' / 'in.txt'}",
            "overwrite=true",
        ),
        ["the completions would replace the prompts"],
    ),
    (
        "input_file X is empty",
        "an empty prompts file",
        lambda w, t: (
            "sample.py",
            f"ckpt={w / 'model'}",
            f"input_file={write(t / 'in.txt', '')}",
            f"output_file={t / 'out.txt'}",
        ),
        ["one prompt per line"],
    ),
    (
        "is a LoRA adapter, not a whole model; fine-tune its base",
        "an adapter directory as base=",
        lambda w, t: (
            "finetune.py",
            f"base={write(t / 'best' / 'adapter_config.json', '{}').parent}",
            "task=parallel",
            f"task.train=[{write(t / 'a.src', LINES)},{write(t / 'a.tgt', LINES)}]",
            f"hydra.run.dir={t / 'run'}",
        ),
        ["gpt_adapter.json", "merge=true"],
    ),
    (
        "num_samples is for a single prompt",
        "num_samples in batch mode",
        lambda w, t: (
            "sample.py",
            f"ckpt={w / 'model'}",
            f"input_file={write(t / 'in.txt', 'ROMEO:')}",
            f"output_file={t / 'out.txt'}",
            "num_samples=3",
        ),
        ["repeat a line"],
    ),
    (
        "but this PyTorch build or machine has no Apple GPU (MPS); use trainer=cpu",
        "a GPU accelerator the machine lacks",
        lambda w, t: train(t, "trainer.accelerator=mps"),
        ["trainer.accelerator=mps"],
    ),  # Linux has no MPS
    (
        "is not one this project runs on",
        "an accelerator we do not run on",
        lambda w, t: train(t, "trainer.accelerator=tpu"),
        ["trainer.accelerator=tpu", "use cpu"],
    ),
    (
        "say where the training data is",
        "task=parallel without its files",
        lambda w, t: ("finetune.py", f"base={w / 'model'}", "task=parallel", f"hydra.run.dir={t / 'run'}"),
        ["task.train=[source,target]"],
    ),
    (
        "ckpt_path resumes a fine-tuning run; eval_only=true scores an adapter",
        "eval_only with ckpt_path",
        lambda w, t: ("finetune.py", "eval_only=true", f"adapter={t}", "ckpt_path=last", f"hydra.run.dir={t / 'run'}"),
        ["drop one of them"],
    ),
    (
        "is not in the local cache and the hub cannot be reached",
        "a hub corpus offline",
        lambda w, t: (*train(t, "data=hub", "data.hub.name=nobody/no-such-corpus"), {"HF_HUB_OFFLINE": "1"}),
        ["'nobody/no-such-corpus'", "data.path"],
    ),
    (
        "but no CUDA GPU is visible",
        "a GPU device on a machine without one",
        lambda w, t: sample(w, "device=mps"),
        ["device=mps", "use device=cpu"],
    ),  # Linux has no MPS
    (
        "a file this run reads",
        "batch output onto the model's own weights, with overwrite=true",
        lambda w, t: (
            "sample.py",
            f"ckpt={copy_model(w, t)}",
            "max_new_tokens=5",
            f"input_file={write(t / 'in.txt', 'ROMEO:')}",
            f"output_file={t / 'model' / 'model.safetensors'}",
            "overwrite=true",
        ),
        ["model.safetensors is a file this run reads", "choose another path"],
    ),
    (
        "a file this run reads",
        "attention map onto the model's config, with overwrite=true",
        lambda w, t: (
            "sample.py",
            f"ckpt={copy_model(w, t)}",
            "max_new_tokens=5",
            "prompt=RO",
            f"attention_map={t / 'model' / 'config.json'}",
            "overwrite=true",
        ),
        ["config.json is a file this run reads"],
    ),
    (
        "exists; choose another output_file",
        "batch output exists",
        lambda w, t: (
            "sample.py",
            f"ckpt={w / 'model'}",
            "max_new_tokens=5",
            f"input_file={write(t / 'in.txt', 'ROMEO:')}",
            f"output_file={write(t / 'out.txt', 'x')}",
        ),
        ["out.txt exists", "overwrite=true"],
    ),
]
# Rows tested elsewhere: a fault the command line cannot make, or another verb's own tests.
ELSEWHERE = {
    "that the prompt template": "tests/test_finetune.py::test_row_text_the_template_has_no_place_for_is_refused",
    "no space left on device": "tests/test_reliability.py::test_full_disk_while_*",
    "is missing tensor": "tests/test_checkpoint.py::test_missing_and_extra_tensors_are_named",
    "config.json lacks": "tests/test_checkpoint.py::test_a_config_missing_a_key_that_changes_the_math_is_refused",
    "holds a truncated or corrupt adapter": (
        "tests/test_finetune.py::test_a_damaged_adapter_directory_is_refused_naming_the_fix"
    ),
    "describes model_type": "tests/test_convert.py::test_mismatches_are_refused_naming_the_key",
    "exists and is not empty": "tests/test_convert.py::test_cli_refuses_to_overwrite_without_force",
    "attention_layer=5 but the model has 4 layers": (
        "tests/test_viz.py::test_attention_heatmap_refuses_a_layer_or_head_that_is_not_there"
    ),
    "a Hydra sweep (-m) cannot start DDP processes": "tests/test_scale.py::test_a_sweep_cannot_launch_ddp_processes",
    "parallel files are not line-aligned": (
        "tests/test_finetune.py::test_mismatched_parallel_files_name_both_files_and_counts"
    ),
    "not valid JSON (": "tests/test_finetune.py::test_malformed_jsonl_names_file_and_line_or_is_skipped_and_counted",
    "belongs to a different base": "tests/test_finetune.py::test_eval_only_and_an_adapter_on_the_wrong_base",
    "is not a config group of": (
        "tests/test_cli.py::test_help_lists_each_scripts_own_config_groups_and_a_foreign_group_is_named"
    ),
    "the checkpoint fine-tuned the base": (
        "tests/test_finetune.py::test_a_resume_with_other_lora_settings_or_another_base_is_refused"
    ),
    "matches no linear layer": "tests/test_finetune.py::test_lora_targets_map_to_our_module_names",
    "processes of a distributed launch": (
        "tests/test_cli.py::test_torchrun_processes_share_one_run_dir_and_only_rank_zero_writes_the_config"
    ),
}


def snapshot(*roots: Path) -> dict:
    return {p: p.read_bytes() for root in roots for p in root.rglob("*") if p.is_file() and ".lock" not in p.name}


@pytest.mark.parametrize("row, make", [(c[0], c[2:]) for c in CASES], ids=[c[1] for c in CASES])
def test_each_mistake_gets_one_line_and_changes_nothing(world, tmp_path, row, make):
    build, needles = make
    call = build(world, tmp_path)
    env = call[-1] if isinstance(call[-1], dict) else {}
    before = snapshot(world, tmp_path)
    proc = run_cli(*(a for a in call if not isinstance(a, dict)), env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert_user_error(proc, *needles)
    if row != "non-finite loss":  # found while training, after training's own output; every other one before it
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # nothing else on stderr around it
    if row == "prompt is N tokens":
        assert proc.stdout == ""  # refused before any of the prompt is streamed
    assert snapshot(world, tmp_path).items() >= before.items()  # every file that was there is unchanged
    assert not (tmp_path / "pwned").exists()  # no pickle was executed


def test_a_refused_run_leaves_no_directory_behind_but_a_named_one_stays(world, tmp_path):
    """runs/<name>/ lists runs, not attempts: the directory Hydra made for a run refused before it wrote
    anything goes with it (a sibling run is untouched, and `latest` goes back to the newest run if it had
    already moved); one the user named with hydra.run.dir stays."""
    empty = write(tmp_path / "empty.txt", "")
    earlier = write(tmp_path / "runs" / "b" / "earlier" / "checkpoints" / "last.ckpt", "x")
    os.symlink("earlier", tmp_path / "runs" / "b" / "latest")
    for name in ("a", "b"):
        proc = run_cli("train.py", *TINY, f"name={name}", "data=text", f"data.path={empty}", cwd=tmp_path)
        assert_user_error(proc, "empty")
    # refused after `latest` moved to it: resuming with another vocabulary
    proc = run_cli(
        "train.py",
        *TINY,
        "name=b",
        "data=text",
        f"data.path={write(tmp_path / 'c.txt', TEXT * 20)}",
        f"ckpt_path={world / 'runs/tiny/done/checkpoints/last.ckpt'}",
        cwd=tmp_path,
    )
    assert_user_error(proc, "model.vocab_size=61")
    assert not (tmp_path / "runs" / "a").exists()
    assert sorted(p.name for p in (tmp_path / "runs" / "b").iterdir()) == ["earlier", "latest"]
    assert os.readlink(tmp_path / "runs" / "b" / "latest") == "earlier" and earlier.read_text() == "x"
    named = tmp_path / "mine"
    assert_user_error(
        run_cli("train.py", *TINY, "data=text", f"data.path={empty}", f"hydra.run.dir={named}", cwd=tmp_path), "empty"
    )
    assert (named / ".hydra" / "config.yaml").is_file()


def test_an_earlier_output_beside_the_model_may_be_overwritten(world, tmp_path):
    """Only the files loading reads are protected: a completions file kept in the model's folder is not one."""
    model = copy_model(world, tmp_path)
    for _ in range(2):
        proc = run_cli(
            "sample.py",
            f"ckpt={model}",
            "max_new_tokens=3",
            f"input_file={write(tmp_path / 'in.txt', 'RO')}",
            f"output_file={model / 'completions.txt'}",
            "overwrite=true",
        )
        assert proc.returncode == 0, proc.stderr
    assert (model / "completions.txt").read_text().count("\n") == 1


def test_a_refused_pickle_is_not_answered_with_torchs_advice_to_load_it_unsafely(tmp_path):
    from gpt.checkpoint import torch_load_safely
    from gpt.errors import GPTError

    with pytest.raises(GPTError) as refused:
        torch_load_safely(evil_ckpt(tmp_path), "only load checkpoints written by this tool")
    assert "GLOBAL posix.mkdir" in str(refused.value)
    assert "weights_only" not in str(refused.value) and "Re-running" not in str(refused.value)
    assert not (tmp_path / "pwned").exists()


def test_the_code_carrying_pickle_is_live(tmp_path):
    """The control for the two pickle rows above: loaded the unsafe way, the file does run its code."""
    torch.load(evil_ckpt(tmp_path), weights_only=False)
    assert (tmp_path / "pwned").is_dir()


def test_the_readme_table_has_a_row_per_case_and_a_case_per_row():
    readme = (ROOT / "docs" / "errors.md").read_text()
    table = readme.split("## Errors and what to do", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    covered = {c[0] for c in CASES} | set(ELSEWHERE)
    for key in covered:
        assert sum(key in row.split(" | ")[0] for row in rows) == 1, f"no single README row shows {key!r}"
    for row in rows:
        assert any(key in row.split(" | ")[0] for key in covered), f"no test for README row {row!r}"
    for key, where in ELSEWHERE.items():  # the named test is there (a rename would leave the row untested)
        path, name = where.split("::")
        names = re.findall(r"^def (test_\w+)", (ROOT / path).read_text(), flags=re.M)
        assert any(fnmatch.fnmatch(n, name) for n in names), f"{where} (for {key!r}) does not exist"
    assert re.search(r"GPT_VERBOSE=1", table)
