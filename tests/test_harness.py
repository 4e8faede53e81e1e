"""lm-evaluation-harness in-process (gpt/harness.py, `python -m gpt.evaluate harness`): our `gpt` model scores
every request as lm-eval's own `hf` model scores the `export-hf` directory of the same weights, on tasks defined
on local files (tests/fixtures/lm_eval/). Offline: tiny random models, a BPE trained on the fixtures."""

import json
import logging

import datasets
import huggingface_hub
import pytest
import torch
import yaml
from conftest import FIXTURES
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from gpt.adapter import add_lora, base_record, lora_config, merge, save_adapter_dir
from gpt.checkpoint import load_model_dir, save_model_dir
from gpt.config import GPTConfig
from gpt.convert import export_hf
from gpt.errors import GPTError
from gpt.evaluate import main
from gpt.harness import GPTLM
from gpt.model import GPT
from gpt.tokenizer import EOS, Tokenizer

TASKS = FIXTURES / "lm_eval"
NAMES = ["tiny_mc", "tiny_lambada", "tiny_wiki", "tiny_qa"]
BLOCK = 48
ARCHS = {
    "gpt2": dict(activation="gelu_tanh"),
    "llama": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False),
}
TEXT = "It is the east, and Juliet is the sun. Arise, fair sun, and kill the envious moon,\n"
LONG = " ".join([TEXT] * 6)  # several times the context


@pytest.fixture(autouse=True)
def quiet():
    logging.disable(logging.WARNING)  # lm-eval's and datasets' chatter
    yield
    logging.disable(logging.NOTSET)


@pytest.fixture(scope="module")
def bpe():
    text = "".join(p.read_text() for p in sorted(TASKS.glob("*.jsonl")))
    return Tokenizer.train_bpe(iter([[text] * 4]), vocab_size=300, show_progress=False)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """The fixture YAMLs with absolute data_files: datasets reads a relative one against the working directory."""
    out = tmp_path_factory.mktemp("tasks")
    for src in TASKS.glob("*.yaml"):
        cfg = yaml.safe_load(src.read_text())
        files = cfg["dataset_kwargs"]["data_files"]
        cfg["dataset_kwargs"]["data_files"] = {split: str(TASKS / name) for split, name in files.items()}
        (out / src.name).write_text(yaml.safe_dump(cfg))
    return out


@pytest.fixture(scope="module", params=list(ARCHS))
def dirs(request, bpe, tmp_path_factory):
    """(our model dir, its export-hf dir) for a random 2-layer model: GPT-2's block or Llama's."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=BLOCK, vocab_size=320, n_layer=2, n_head=4, n_embd=32, **ARCHS[request.param])
    model = GPT(config).eval()
    with torch.no_grad():  # norms at 1 and biases at 0 would hide mapping bugs
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    root = tmp_path_factory.mktemp(request.param)
    ours = save_model_dir(model, bpe, root / "ours")
    return ours, export_hf(ours, root / "hf")


def hflm(hf_dir) -> HFLM:
    return HFLM(pretrained=str(hf_dir), device="cpu", batch_size=4, dtype="float32")


def evaluate(lm, task_dir) -> dict:
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    return simple_evaluate(model=lm, tasks=NAMES, task_manager=manager, bootstrap_iters=0, log_samples=True)


def flatten(resps) -> list:
    """A sample's responses as flat values: (logprob, is_greedy) pairs, rolling sums, generated texts."""
    return [r[0] for r in resps]


def test_every_request_and_metric_equals_lm_evals_hf_model(dirs, task_dir, bpe):
    ours_dir, hf_dir = dirs
    ours, theirs = (
        evaluate(GPTLM(str(ours_dir), device="cpu", batch_size=4), task_dir),
        evaluate(hflm(hf_dir), task_dir),
    )
    worst, greedy_flags, texts = 0.0, 0, 0
    for task in NAMES:
        a, b = ours["samples"][task], theirs["samples"][task]
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert x["arguments"] == y["arguments"]
            for mine, hf in zip(flatten(x["resps"]), flatten(y["resps"]), strict=True):
                if isinstance(mine, str):  # generate_until
                    assert mine == hf
                    texts += 1
                elif isinstance(mine, float):  # loglikelihood_rolling
                    worst = max(worst, abs(mine - hf))
                else:  # loglikelihood: (logprob, is_greedy)
                    worst, greedy_flags = max(worst, abs(mine[0] - hf[0])), greedy_flags + 1
                    assert mine[1] == hf[1]
        for metric, value in ours["results"][task].items():
            if metric.split(",")[0] in ("acc", "acc_norm", "exact_match") or isinstance(value, str):  # exactly
                assert value == theirs["results"][task][metric], (task, metric)
            elif metric != "alias":  # perplexities, bits per byte: sums of logprobs, as close as those
                assert value == pytest.approx(theirs["results"][task][metric], rel=1e-5), (task, metric)
    assert worst < 1e-4 and greedy_flags > 20 and texts == 4
    print(f"\nmax |loglikelihood difference| vs hf ({ours_dir.parent.name}): {worst:.2e}")
    # the fixtures reach past the context: a multiple-choice question is cut from the left, a page takes windows
    mc = [len(bpe.encode(s["arguments"][0][0] + s["arguments"][0][1])) for s in ours["samples"]["tiny_mc"]]
    pages = [len(bpe.encode(s["arguments"][0][0])) for s in ours["samples"]["tiny_wiki"]]
    assert max(mc) > BLOCK + 1 and max(pages) > 2 * BLOCK


def requests(kind: str, *args) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def greedy_pair(lm: GPTLM) -> tuple[str, str]:
    """A context and the one-token text greedy decoding continues it with, that encodes back to that token."""
    for prompt in ("Juliet is the sun,", "moon.", "It is the east;", "Arise, fair sun!", "grief:", "envious", "Who"):
        ids = lm.tok_encode(prompt)
        with torch.no_grad():
            token = int(lm.model(torch.tensor([ids])).logits[0, -1].argmax())
        text = lm.tokenizer.decode([token])
        if text and lm.tok_encode(prompt + text) == ids + [token]:
            return prompt, text
    raise AssertionError("no prompt whose greedy token encodes back to itself")


def test_edge_requests_equal_hf(dirs, bpe):
    """Empty contexts (the end-of-text token as prefix), trailing spaces, a continuation greedy decoding gives,
    contexts far past the block (cut from the left), texts of several windows, prompts longer than the block."""
    ours_dir, hf_dir = dirs
    ours, theirs = GPTLM(str(ours_dir), device="cpu", batch_size=3), hflm(hf_dir)
    prompt, greedy = greedy_pair(ours)
    pairs = [
        ("", " the sun"),
        ("", EOS + "Arise"),  # starts with the prefix token itself: lm-eval takes it as the context
        ("the envious  ", "moon"),  # trailing spaces move to the continuation
        (prompt, greedy),  # is_greedy: true
        (prompt, greedy + greedy),
        (LONG, " moon"),  # ~4x the block: cut from the left
        (LONG[:100], LONG[100:190]),  # a continuation that fills most of the block
    ]
    assert BLOCK / 2 < len(bpe.encode(LONG[100:190])) <= BLOCK
    with pytest.raises(GPTError, match="a continuation of .* tokens cannot be scored by a model whose context is 48"):
        ours.loglikelihood(requests("loglikelihood", ("Juliet", LONG)))  # (hf: an AssertionError)
    a, b = (
        ours.loglikelihood(requests("loglikelihood", *pairs)),
        theirs.loglikelihood(requests("loglikelihood", *pairs)),
    )
    assert [g for _, g in a] == [g for _, g in b] and a[3][1] is True
    assert max(abs(x - y) for (x, _), (y, _) in zip(a, b)) < 1e-4
    texts = [(LONG,), (TEXT,), ("x",), ("",)]
    a, b = (
        ours.loglikelihood_rolling(requests("loglikelihood_rolling", *texts)),
        theirs.loglikelihood_rolling(requests("loglikelihood_rolling", *texts)),
    )
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4 and a[3] == b[3] == 0
    gens = [(LONG, {"until": ["moon"], "max_gen_toks": 8}), (TEXT[:20], {"until": [" "], "max_gen_toks": 4})]
    gens += [(TEXT, {"until": ["\n", "."], "max_gen_toks": 12, "do_sample": False})]
    assert ours.generate_until(requests("generate_until", *gens)) == theirs.generate_until(
        requests("generate_until", *gens)
    )


def test_adapter_evaluates_as_its_merged_model(dirs, tmp_path):
    ours_dir, _ = dirs
    model, tok = load_model_dir(ours_dir)
    peft_model = add_lora(model, lora_config(rank=4, targets=["qkv", "mlp", "lm_head"])).eval()
    with torch.no_grad():  # fresh LoRA factors are a no-op (B = 0): make the adapter change the model
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.05 * torch.randn_like(p))
    adapter = save_adapter_dir(peft_model, tok, tmp_path / "adapter", {"base": base_record(ours_dir), "task": {}})
    merged = save_model_dir(merge(peft_model), tok, tmp_path / "merged")
    lms = [GPTLM(str(p), device="cpu", merge=m) for p, m in ((merged, True), (adapter, True), (adapter, False))]
    pairs = [("Juliet is", " the sun"), ("", TEXT), (LONG, " moon")]
    scores = [lm.loglikelihood(requests("loglikelihood", *pairs)) for lm in lms]
    rolling = [lm.loglikelihood_rolling(requests("loglikelihood_rolling", (LONG,))) for lm in lms]
    texts = [lm.generate_until(requests("generate_until", (TEXT, {"max_gen_toks": 6}))) for lm in lms]
    for i in (1, 2):
        assert [g for _, g in scores[i]] == [g for _, g in scores[0]]
        assert max(abs(x - y) for (x, _), (y, _) in zip(scores[i], scores[0])) < 1e-5
        assert abs(rolling[i][0] - rolling[0][0]) < 1e-5 and texts[i] == texts[0]
    base = GPTLM(str(ours_dir), device="cpu").loglikelihood(requests("loglikelihood", *pairs))
    assert max(abs(x - y) for (x, _), (y, _) in zip(base, scores[0])) > 1e-2  # the adapter does change the numbers


def test_registered_as_gpt_and_built_from_an_argument_string(dirs):
    ours_dir, _ = dirs
    lm = get_model("gpt").create_from_arg_string(f"pretrained={ours_dir},batch_size=2,dtype=float32", {"device": "cpu"})
    assert isinstance(lm, GPTLM) and lm.batch_size == 2 and lm.max_length == BLOCK
    assert lm.tok_encode("Juliet is the sun") == Tokenizer.load(ours_dir).encode("Juliet is the sun")


@pytest.mark.parametrize("dirs", ["gpt2"], indirect=True)
def test_the_command_prints_lm_evals_table_and_writes_its_results(dirs, task_dir, capsys):
    ours_dir, _ = dirs
    out = ours_dir.parent / "results.json"
    main(["harness", str(ours_dir), "--tasks", "tiny_mc,tiny_wiki", "--include-path", str(task_dir)])
    main(["harness", str(ours_dir), "--tasks", "tiny_mc", "--include-path", str(task_dir), "--limit", "2"])
    main(["harness", str(ours_dir), "--tasks", "tiny_mc", "--include-path", str(task_dir), "--output", str(out)])
    printed = capsys.readouterr().out
    assert "|tiny_mc " in printed and "|tiny_wiki" in printed and "acc_norm" in printed and "bits_per_byte" in printed
    written = sorted((ours_dir / "lm_eval").glob("results_*.json"))
    assert len(written) in (1, 2)  # two runs in the same second share a name
    results = json.loads(out.read_text())
    assert results["n-samples"]["tiny_mc"]["effective"] == 5
    direct = evaluate(GPTLM(str(ours_dir), device="cpu"), task_dir)["results"]["tiny_mc"]
    assert results["results"]["tiny_mc"]["acc,none"] == direct["acc,none"]
    assert f"{direct['acc_norm,none']:.4f}" in printed


@pytest.mark.parametrize("dirs", ["gpt2"], indirect=True)
@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--tasks", "no_such_task_xyz"], "unknown lm-eval task 'no_such_task_xyz'"),
        (["--tasks", "tiny_mc", "--limit", "0"], "--limit must be a positive whole number"),
        (["--tasks", "tiny_mc", "--limit", "1.5"], "--limit must be a positive whole number"),
        (["--tasks", ","], "--tasks names no task"),
        (["--tasks", "hellaswag"], "task 'hellaswag' could not be loaded (ConnectionError"),  # on the hub only
        (["--tasks", "tiny_mc", "--device", "gpu"], "--device must be"),
        (["--tasks", "tiny_mc", "--base", "x"], "--base is for adapters"),
    ],
)
def test_bad_input_is_one_error_line(argv, needle, dirs, task_dir, monkeypatch, capsys):
    for module in (datasets.config, huggingface_hub.constants):  # the hub is unreachable: fail at once
        monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    with pytest.raises(SystemExit) as e:
        main(["harness", str(dirs[0]), "--include-path", str(task_dir), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: ") and needle in err[-1], err


def test_a_missing_model_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["harness", str(tmp_path / "nope"), "--tasks", "tiny_mc"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [
        f"error: {tmp_path / 'nope'} does not exist; point at a model directory, a .ckpt or an adapter directory"
    ]
