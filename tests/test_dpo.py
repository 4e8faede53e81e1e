"""Preference tuning (finetune.py method=dpo): the loss against numbers computed here from the two models' own
per-token log-probabilities, the masking of each answer token by token, the pairs' files and their bad rows, and
the showcase's task (pairs made from parallel text) trained, killed, resumed and scored through finetune.py."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_user_error, run_cli
from faults import assert_resumed_run_matches, kill_then_resume, logged
from test_finetune import base_dir, randomise_lora, task_files  # noqa: F401 (fixtures)

from gpt.adapter import add_lora, lora_config
from gpt.checkpoint import load_model_dir
from gpt.errors import GPTError
from gpt.lit import LanguageModel
from gpt.preference import PreferenceLoss, PreferenceModel, answer_logps
from gpt.taskrows import FORMATS, BadRows, read_json_records
from gpt.tasks import TaskDataModule

TEMPLATE = "Q: {input}\nA:"  # a template of the test's own, so that the prompt below is written out by hand


@pytest.fixture(scope="module")
def pairs_file(task_files, tmp_path_factory):
    """The made-up task's pairs as preference rows: prompt = the modern line, chosen = the archaic one, rejected =
    the modern line again (the rows whose two lines are the same prefer nothing: left out)."""
    src = (task_files / "train.src").read_text().splitlines()
    tgt = (task_files / "train.tgt").read_text().splitlines()
    path = tmp_path_factory.mktemp("prefs") / "pairs.jsonl"
    rows = [{"prompt": s, "chosen": t, "rejected": s} for s, t in zip(src, tgt) if s != t]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:48]))
    return path


def preference_task(path, tok, **kw) -> TaskDataModule:
    args = dict(
        name="prefs",
        format="preference",
        template=TEMPLATE,
        tokenizer=tok,
        block_size=256,
        batch_size=6,
        train=str(path),
        valid=str(path),
        metrics=["loss"],
    )
    dm = TaskDataModule(**{**args, **kw})
    dm.setup()
    return dm


def policy_and_reference(base_dir, weights: str):
    """(policy, reference for PreferenceModel, an independent copy of the base loaded again for the test)."""
    model, tok = load_model_dir(base_dir)
    if weights == "lora":
        return add_lora(model, lora_config(rank=4, dropout=0.1)), None, load_model_dir(base_dir)[0], tok
    return model, copy.deepcopy(model), load_model_dir(base_dir)[0], tok


@pytest.mark.parametrize("weights", ["lora", "full"])
def test_at_step_0_the_loss_is_log_2_and_the_rewards_are_0(base_dir, pairs_file, weights):
    """Before any step the policy is its reference: every reward is 0, so every pair's loss is log 2 (LoRA's B
    starts at 0; its dropout, on in train mode, then changes nothing)."""
    policy, reference, _, tok = policy_and_reference(base_dir, weights)
    dm = preference_task(pairs_file, tok)
    module = PreferenceModel(policy, tok, PreferenceLoss("dpo", 0.1, 0.0), reference).train()
    batch = next(iter(dm.train_dataloader()))
    loss, logged_now = module.training_loss(batch)
    assert abs(loss.item() - math.log(2)) < 1e-6
    for key in ("chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy"):
        assert logged_now[key].item() == 0.0, key


def test_a_resume_as_another_method_or_weights_or_beta_is_refused(base_dir):
    """What run.train asks of a checkpoint before the Trainer starts (LanguageModel.check_resumable)."""
    policy, reference, _, tok = policy_and_reference(base_dir, "full")
    module = PreferenceModel(policy, tok, PreferenceLoss("dpo", 0.1, 0.0), reference)
    module.base = {"path": "b", "sha256": "s", "method": "dpo", "weights": "full"}
    saved = {"path": "b", "sha256": "s", "method": "dpo", "weights": "lora"}
    with pytest.raises(GPTError, match="fine-tuned with dpo.weights=lora, this run has full"):
        module.check_resumable({"gpt": {"base": saved}})
    sft = LanguageModel(policy, tok)
    sft.base = {"path": "b", "sha256": "s", "method": "full"}
    with pytest.raises(GPTError, match="fine-tuned with method=dpo, this run has full"):
        sft.check_resumable({"gpt": {"base": {**saved, "weights": "full"}}})
    other = {"dpo": {"loss": "dpo", "beta": 0.5}}
    with pytest.raises(GPTError, match="trained with dpo.beta=0.5, this run has 0.1"):
        module.check_resumable({"gpt": {"base": module.base, "settings": other}, "state_dict": {}})


def direct_logp(model, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """log p(answer | prompt) summed over the answer's tokens: one unpadded row, log-softmax, pick the tokens."""
    seq = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model.eval()(seq[:, :-1]).logits.double(), -1)[0]
    return sum(logp[len(prompt_ids) - 1 + j, t].item() for j, t in enumerate(answer_ids))


@pytest.mark.parametrize("weights,loss", [("lora", "dpo"), ("full", "dpo"), ("lora", "simpo")])
def test_the_loss_equals_a_direct_computation_from_both_models(base_dir, pairs_file, weights, loss):
    """Policy moved away from the base; the reference is the base loaded again (so LoRA's disable_adapter is
    checked against the base itself). Each answer is `template(prompt) + answer + <|endoftext|>` tokenized here."""
    policy, reference, base, tok = policy_and_reference(base_dir, weights)
    if weights == "lora":
        randomise_lora(policy)
    else:
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    beta, gamma = (0.1, 0.0) if loss == "dpo" else (2.0, 0.5)
    dm = preference_task(pairs_file, tok)
    rows = dm.load_rows()["train"][:5]
    assert len(dm.data["train"]) == len(dm.load_rows()["train"])  # nothing dropped: data[i] is rows[i]
    module = PreferenceModel(policy, tok, PreferenceLoss(loss, beta, gamma), reference).eval()
    stats = module.pair_stats(dm.collate(dm.data["train"][:5]))

    expected_loss, expected_rewards = [], []
    for row in rows:
        prompt = tok.encode(f"Q: {row['input']}\nA:")
        w, l_ = tok.encode(row["output"]) + [tok.eos_id], tok.encode(row["rejected"]) + [tok.eos_id]
        if loss == "dpo":
            rw = beta * (direct_logp(policy, prompt, w) - direct_logp(base, prompt, w))
            rl = beta * (direct_logp(policy, prompt, l_) - direct_logp(base, prompt, l_))
            expected_loss.append(-F.logsigmoid(torch.tensor(rw - rl)).item())
        else:
            rw, rl = beta * direct_logp(policy, prompt, w) / len(w), beta * direct_logp(policy, prompt, l_) / len(l_)
            expected_loss.append(-F.logsigmoid(torch.tensor(rw - rl - gamma)).item())
        expected_rewards.append((rw, rl))
    assert stats["loss"].tolist() == pytest.approx(expected_loss, abs=1e-5)
    assert stats["chosen_reward"].tolist() == pytest.approx([r[0] for r in expected_rewards], abs=1e-5)
    assert stats["rejected_reward"].tolist() == pytest.approx([r[1] for r in expected_rewards], abs=1e-5)
    assert stats["reward_accuracy"].tolist() == [float(w > l_) for w, l_ in expected_rewards]
    assert min(abs(w - l_) for w, l_ in expected_rewards) > 1e-4  # the accuracy above is not decided by rounding


def test_each_answer_is_learnt_token_by_token_and_nothing_else(base_dir, pairs_file):
    """Rows 0..B-1 chosen, B..2B-1 rejected; on each, labels only on the answer and its <|endoftext|>, never on
    the prompt or the padding; a gradient reaches the logits of those positions only."""
    _, tok = load_model_dir(base_dir)
    dm = preference_task(pairs_file, tok)
    rows = dm.load_rows()["train"][:4]
    batch = dm.collate(dm.data["train"][:4])
    assert batch["pairs"] == 4 and batch["input_ids"].shape[0] == 8
    T = batch["input_ids"].shape[1]
    for i, row in enumerate(rows):
        prompt = tok.encode(f"Q: {row['input']}\nA:")
        for r, answer in ((i, row["output"]), (4 + i, row["rejected"])):
            full = prompt + tok.encode(answer) + [tok.eos_id]
            n = len(full) - 1
            assert batch["input_ids"][r, :n].tolist() == full[:-1]
            assert batch["labels"][r].tolist() == [-100] * (len(prompt) - 1) + full[len(prompt) :] + [-100] * (T - n)
    logits = torch.randn(8, T, tok.vocab_size, requires_grad=True)
    answer_logps(logits, batch["labels"])[0].sum().backward()
    learnt = batch["labels"] != -100
    assert logits.grad[~learnt].abs().max() == 0 and (logits.grad[learnt].abs().amax(-1) > 0).all()


def test_a_conversation_pair_learns_its_last_reply_only(base_dir, tmp_path):
    """The chat form: the two conversations share all but their last message; the loss counts the last assistant
    reply (as the default chat template renders it: its text and <|endoftext|>), not the earlier one."""
    _, tok = load_model_dir(base_dir)
    shared = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Your name?"},
    ]
    record = {
        "chosen": [*shared, {"role": "assistant", "content": "Ariel."}],
        "rejected": [*shared, {"role": "assistant", "content": "No."}],
    }
    (tmp_path / "chat.jsonl").write_text(json.dumps(record) + "\n")
    dm = preference_task(tmp_path / "chat.jsonl", tok, batch_size=1)
    batch = dm.collate(dm.data["train"])
    text = "System: Be brief.\nUser: Hi\nAssistant: Hello.<|endoftext|>User: Your name?\nAssistant:"
    assert dm.prompt(dm.load_rows()["train"][0]) == text  # what scoring answers
    prompt, T = tok.encode(text), batch["input_ids"].shape[1]
    for r, reply in ((0, " Ariel.<|endoftext|>"), (1, " No.<|endoftext|>")):
        full = prompt + tok.encode(reply)
        assert full[-1] == tok.eos_id
        assert batch["input_ids"][r, : len(full) - 1].tolist() == full[:-1]
        pad = T - len(full) + 1
        assert batch["labels"][r].tolist() == [-100] * (len(prompt) - 1) + full[len(prompt) :] + [-100] * pad
    assert dm.describe()["chat_template"]  # recorded, so that sample.py chat=true prompts it as trained


GOOD = {"prompt": "Hi", "chosen": "Hail.", "rejected": "Hi."}
TURN = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    "record,needles",
    [
        ({"prompt": "Hi", "chosen": "Hail."}, ["missing or empty field 'rejected'", "'chosen', 'prompt'"]),
        ({**GOOD, "chosen": 3}, ["field 'chosen' must be text or a list of messages (got int)"]),
        ({**GOOD, "prompt": ""}, ["missing or empty field 'prompt'"]),
        ({**GOOD, "rejected": "Hail."}, ["'chosen' and 'rejected' are the same answer"]),
        (
            {"chosen": [*TURN, {"role": "assistant", "content": "Hail."}], "rejected": "Hi."},
            ["'chosen' and 'rejected' must both be text or both be conversations", "list and str"],
        ),
        (
            {
                "chosen": [*TURN, {"role": "assistant", "content": "Hail."}],
                "rejected": [{"role": "user", "content": "Yo"}, {"role": "assistant", "content": "Hi."}],
            },
            ["must share the conversation up to the last (assistant) message", "they differ at message 0"],
        ),
        (
            {"chosen": [*TURN, {"role": "assistant", "content": "Hail."}], "rejected": TURN},
            ["the last message of 'rejected' must be the assistant's answer", "it is 'user'"],
        ),
        (
            {"chosen": [*TURN, {"role": "bot", "content": "Hail."}], "rejected": TURN},
            ["'chosen' message 1 needs 'role'", "'assistant', 'system', 'user'"],
        ),
    ],
)
def test_a_bad_preference_row_is_one_line_naming_file_line_and_field(tmp_path, record, needles):
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps(GOOD) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(GPTError) as e:
        read_json_records(f, FORMATS["preference"], "p", BadRows("error", "p"))
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"{f}:2: ") and line.endswith("task.on_bad_row=skip to skip bad rows")
    for needle in needles:
        assert needle in line, line
    bad = BadRows("skip", "p")
    rows = read_json_records(f, FORMATS["preference"], "p", bad)
    assert rows == [{"instruction": "", "input": "Hi", "output": "Hail.", "rejected": "Hi."}]
    assert bad.report("train") == 1


def test_a_bad_row_and_a_task_of_the_wrong_kind_stop_finetune_py_in_one_line(base_dir, tmp_path):
    (tmp_path / "pairs.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps({"prompt": "Yo", "chosen": "Hail."}))
    for i, (args, needles) in enumerate(
        [
            (
                ["method=dpo", "task=preference", f"task.train={tmp_path / 'pairs.jsonl'}"],
                [f"{tmp_path / 'pairs.jsonl'}:2: missing or empty field 'rejected'", "fix the row"],
            ),
            (["method=dpo", "task=parallel"], ["method=dpo trains on preference pairs", "task=preference"]),
            (["task=preference"], ["add method=dpo"]),
            (["method=dpo", "task=preference", "dpo.weights=half"], ["dpo.weights must be one of ['lora', 'full']"]),
        ]
    ):
        proc = run_cli("finetune.py", f"base={base_dir}", *args, f"hydra.run.dir={tmp_path / str(i)}")
        assert_user_error(proc, *needles)
        assert not (tmp_path / str(i) / "checkpoints").exists()
    for settings, needle in (
        (("dpo", 0.0, 0.0), "dpo.beta must be a finite number > 0"),
        (("ipo", 0.1, 0.0), "dpo.loss"),
    ):
        with pytest.raises(GPTError, match=needle):
            PreferenceLoss(*settings)


@pytest.fixture(scope="module")
def few_pairs(pairs_dir, tmp_path_factory):
    """The made-up task cut to 40 train and 8 valid pairs, in its layout: an epoch is a few batches."""
    d = tmp_path_factory.mktemp("few") / "shakespeare_modern"
    d.mkdir()
    for split, n in (("train", 40), ("valid", 8)):
        for side in ("modern", "original"):
            lines = (pairs_dir / f"{split}.{side}").read_text().splitlines(True)[:n]
            (d / f"{split}.{side}").write_text("".join(lines))
    return d


def test_the_showcase_task_trains_resumes_after_a_kill_as_if_never_stopped_and_scores(few_pairs, base_dir, tmp_path):
    """configs/task/shakespeare_modern_dpo.yaml on the made-up pairs: killed halfway through writing the step-8
    checkpoint, resumed with ckpt_path=last (from step 4, mid-epoch and across epochs: 5 batches of 8 pairs an
    epoch): the same losses and rewards step by step, the same best adapter, as a run never stopped; step 0 logs
    log 2 and rewards 0; scoring gives BLEU / chrF for base, adapter and copy and the reward accuracy."""
    args = [
        f"base={base_dir}",
        "method=dpo",
        "task=shakespeare_modern_dpo",
        f"task.root={few_pairs}",
        "task.batch_size=8",
        "task.max_new_tokens=8",
        "trainer.max_steps=12",
        "trainer.val_check_interval=4",
        "trainer.log_every_n_steps=1",
        "trainer.precision=32-true",
        "optim.lr=1e-2",
        "optim.warmup_steps=2",
        "lora.rank=4",
        "lora.dropout=0.1",
        "eval.max_examples=4",
        "trainer.enable_progress_bar=false",
        "name=dpo-resume",
    ]
    ref, killed, resumed = kill_then_resume("finetune.py", args, tmp_path, kill="kill_saving@8")
    assert_resumed_run_matches(resumed, ref, resumed_at=4, steps=12)
    for key in ("train/chosen_reward", "train/rejected_reward", "train/reward_accuracy", "val/reward_margin"):
        assert logged(resumed, key) == {s: v for s, v in logged(ref, key).items() if s >= 4}, key
    assert logged(ref, "train/loss")[0] == pytest.approx(math.log(2), abs=1e-6)
    assert logged(ref, "train/chosen_reward")[0] == logged(ref, "train/rejected_reward")[0] == 0.0
    assert logged(ref, "val/loss")[11] < math.log(2) and logged(ref, "val/reward_accuracy")[11] > 0.5
    scores = json.loads((resumed / "metrics.json").read_text())["eval"]
    assert set(scores["adapter"]) >= {"val_loss", "reward_accuracy", "reward_margin", "bleu", "chrf"}
    assert set(scores["base"]) >= {"bleu", "chrf"} and "val_loss" not in scores["base"]
    assert scores["copy"]["bleu"] > 0 and scores["examples"] == 4
    assert scores["adapter"]["val_loss"] == pytest.approx(min(logged(ref, "val/loss").values()), abs=1e-4)  # best
