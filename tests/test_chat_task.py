"""task=chat: conversations (OpenAI's and ShareGPT's layouts) rendered with a Jinja chat template, the loss on
every assistant message only, the template stored as tokenizer_config.json that transformers renders alike."""

import json
import string

from transformers import PreTrainedTokenizerFast

from gpt.checkpoint import save_model_dir
from gpt.config import GPTConfig
from gpt.model import GPT
from gpt.prompts import DEFAULT_CHAT_TEMPLATE, ChatTemplate, tokenizer_config
from gpt.tasks import TaskDataModule
from gpt.tokenizer import EOS, Tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Name?"},
    {"role": "assistant", "content": "Bot."},
]


def chat_task(tmp_path, records, **kw):
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = Tokenizer.char_level(string.ascii_letters + string.punctuation + " \n")
    task = TaskDataModule(
        name="chat",
        format="chat",
        template="{input}",
        tokenizer=tok,
        block_size=256,
        train=str(tmp_path / "chats.jsonl"),
        valid=str(tmp_path / "chats.jsonl"),
        **kw,
    )
    task.prepare_data()
    return task, tok


def test_the_loss_counts_every_assistant_message_token_by_token(tmp_path):
    task, tok = chat_task(tmp_path, [{"messages": CONVERSATION}])
    e = task.data["train"][0]
    text = "System: Be brief.\nUser: Hi\nAssistant: Hello.<|endoftext|>User: Name?\nAssistant: Bot.<|endoftext|>"
    assert ChatTemplate(DEFAULT_CHAT_TEMPLATE, {"eos_token": EOS})(CONVERSATION, add_generation_prompt=False) == text
    ids = tok.encode(text)
    assert e["input_ids"] == ids[:-1]
    learned = " Hello.<|endoftext|>", " Bot.<|endoftext|>"
    want = [-100] * len(ids[1:])
    for span in learned:  # the label at i is token i + 1: learned when that token is in an assistant message
        start = len(tok.encode(text[: text.index(span)]))
        for j in range(start, start + len(tok.encode(span))):
            want[j - 1] = ids[j]
    assert e["labels"] == want
    # scoring prompts with the conversation up to the last assistant message, its answer the reference
    row = task.load_rows()["valid"][0]
    assert task.prompt(row) == "System: Be brief.\nUser: Hi\nAssistant: Hello.<|endoftext|>User: Name?\nAssistant:"
    assert (row["input"], row["output"]) == ("Name?", "Bot.")


def test_sharegpt_layout_through_the_field_mapping(tmp_path):
    shared = {
        "conversations": [
            {"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
            for m in CONVERSATION
        ]
    }
    fields = dict(messages="conversations", role="from", content="value", user="human", assistant="gpt")
    task, _ = chat_task(tmp_path, [shared], fields=fields)
    openai, _ = chat_task(tmp_path / "..", [{"messages": CONVERSATION}])
    assert task.data["train"][0]["labels"] == openai.data["train"][0]["labels"]


def test_the_stored_template_renders_the_same_prompt_in_transformers(tmp_path):
    task, tok = chat_task(tmp_path, [{"messages": CONVERSATION}])
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=8))
    out = save_model_dir(model, tok, tmp_path / "m", files={"tokenizer_config.json": tokenizer_config(task.chat.jinja)})
    hf = PreTrainedTokenizerFast.from_pretrained(out)
    for messages in (CONVERSATION[:2], CONVERSATION[:4]):
        theirs = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert theirs == ChatTemplate.for_model(out)(messages) == task.chat(messages)
    # a base model's own template is the one used (and stored)
    own = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    task2, _ = chat_task(tmp_path / "..", [{"messages": CONVERSATION}], chat_template=own)
    assert task2.prompt(task2.load_rows()["valid"][0]).endswith("<user>Name?<assistant>")
