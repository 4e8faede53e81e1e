"""Files of the wrong shape: every JSON file we read (our config.json and its "gpt" record, tokenizer_config.json,
gpt_adapter.json, PEFT's adapter_config.json, a token store's meta.json, chat / Alpaca task rows) is either read or
refused with one line, whatever it holds: an array where an object belongs, nesting a hundred thousand deep, a
misspelt key (refused with the nearest valid name), a field of another type, a field missing. The examples
through the real loaders (one through the real script), then a Hypothesis property over random JSON shapes and
mutations of a valid file, per file kind, through the same in-process loaders.
"""

import copy
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_user_error, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from gpt.adapter import add_lora, base_record, load_adapter, lora_config, read_adapter_record, save_adapter_dir
from gpt.checkpoint import load_model, load_model_dir, save_model_dir
from gpt.config import GPTConfig
from gpt.data import TokenStore, warn_unknown
from gpt.errors import MAX_JSON_DEPTH, GPTError, loads_json, read_json
from gpt.hftokenizer import tokenizer_from_hf
from gpt.model import GPT
from gpt.prompts import DEFAULT_CHAT_TEMPLATE, ChatTemplate, finetuned_record, tokenizer_config
from gpt.sample import prompt_template
from gpt.taskrows import FORMATS, BadRows, read_json_records
from gpt.tasks import TaskDataModule
from gpt.tokenizer import Tokenizer

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
DEEP = 100_000
CHAT_ROW = {"messages": [{"role": "user", "content": "But soft"}, {"role": "assistant", "content": "what light"}]}
ALPACA_ROW = {"instruction": "Answer", "input": "But soft", "output": "what light"}
TASK = {"name": "t", "format": "parallel", "template": "Q: {input}\nA:", "template_no_input": None, "stop": ["\n"]}


def one_line(message: str) -> str:
    assert message and "\n" not in message and "\r" not in message, repr(message)
    return message


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    """A tiny model directory (with a chat template and a run record), a LoRA adapter on it, a token store."""
    root = tmp_path_factory.mktemp("json")
    tok = Tokenizer.char_level(TEXT)
    model = GPT(GPTConfig(block_size=32, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16))
    model_dir = save_model_dir(
        model,
        tok,
        root / "model",
        extra={"step": 3, "task": TASK, "decoding": {"num_beams": 1}},
        files={"tokenizer_config.json": tokenizer_config(DEFAULT_CHAT_TEMPLATE)},
    )
    base, tok = load_model_dir(model_dir)
    adapter = save_adapter_dir(
        add_lora(base, lora_config(rank=2, targets=["qkv"])),
        tok,
        root / "adapter",
        {"base": base_record(model_dir), "task": TASK, "decoding": {"num_beams": 1}, "step": 3},
    )
    store = root / "store"
    store.mkdir()
    tok.save(store / "tokenizer.json")
    np.arange(100, dtype=np.uint16).__mod__(tok.vocab_size).astype(np.uint16).tofile(store / "tokens.bin")
    (store / "meta.json").write_text(
        json.dumps({"dtype": "uint16", "n_tokens": 100, "n_train": 90, "n_unknown": 0, "unknown_chars": ""})
    )
    return {"model": model_dir, "adapter": adapter, "store": store, "tok": tok}


def copy_of(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    return Path(shutil.copytree(src, dst))


# -- the examples ---------------------------------------------------------------------------------------------


def test_a_tokenizer_config_that_is_an_array_is_one_line(made, tmp_path):
    """ChatTemplate.for_model (sample.py chat=true, serve, task=chat fine-tuning) on a JSON array: it was an
    AttributeError ('list' object has no attribute 'get')."""
    d = copy_of(made["model"], tmp_path / "m")
    (d / "tokenizer_config.json").write_text('[{"chat_template": "{{ messages }}"}]')
    with pytest.raises(GPTError) as e:
        ChatTemplate.for_model(d)
    assert one_line(str(e.value)) == (
        f"{d / 'tokenizer_config.json'}: holds an array where an object belongs; "
        "fix or remove it (it holds the model's chat_template)"
    )
    # a chat_template of the wrong type inside an object, too, and the list form with an entry that is no object
    for template in (5, [["default", "{{ x }}"]], [{"name": "default", "template": 7}]):
        (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
        with pytest.raises(GPTError, match="chat_template must be a Jinja template") as e:
            ChatTemplate.for_model(d)
        one_line(str(e.value))
    # the valid list form still reads
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "default", "template": "T"}]}))
    assert ChatTemplate.for_model(d).jinja == "T"


def test_the_array_tokenizer_config_through_the_real_script(made, tmp_path):
    d = copy_of(made["model"], tmp_path / "m")
    (d / "tokenizer_config.json").write_text("[]")
    proc = run_cli("sample.py", f"ckpt={d}", "chat=true", "max_new_tokens=4", "device=cpu", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = assert_user_error(proc, "tokenizer_config.json: holds an array where an object belongs")
    assert line == (
        f"error: {d / 'tokenizer_config.json'}: holds an array where an object belongs; "
        "fix or remove it (it holds the model's chat_template)"
    )
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_chat_row_nested_a_hundred_thousand_deep(tmp_path):
    """json.loads raises RecursionError on it (a traceback, before): refused naming file:line and the depth,
    or (task.on_bad_row=skip) skipped and counted like any bad row; 64 levels are the most we take."""
    f = tmp_path / "chats.jsonl"
    deep = '{"messages": ' + "[" * DEEP + "]" * DEEP + "}"
    f.write_text(json.dumps(CHAT_ROW) + "\n" + deep + "\n" + json.dumps(CHAT_ROW) + "\n")
    with pytest.raises(GPTError) as e:
        read_json_records(f, FORMATS["chat"], "chat", BadRows("error", "chat"))
    assert one_line(str(e.value)) == (
        f"{f}:2: nested too deeply (JSON arrays/objects more than {MAX_JSON_DEPTH} levels deep); fix the row, "
        "or pass task.on_bad_row=skip to skip bad rows"
    )
    bad = BadRows("skip", "chat")
    rows = read_json_records(f, FORMATS["chat"], "chat", bad)
    assert [r["output"] for r in rows] == ["what light", "what light"]
    assert [s.split(": ")[0] for s in bad.skipped] == [f"{f}:2"]
    # the limit itself: 64 levels read (a message is then no object: a bad row of its own kind), 65 do not
    for levels, needle in ((MAX_JSON_DEPTH, "message 0 needs 'role'"), (MAX_JSON_DEPTH + 1, "nested too deeply")):
        inner = "[" * (levels - 1) + "]" * (levels - 1)  # the row's object is the first level
        f.write_text('{"messages": ' + inner + "}\n")
        with pytest.raises(GPTError, match=needle):
            read_json_records(f, FORMATS["chat"], "chat", BadRows("error", "chat"))
    # a whole JSON array file nested too deeply: one line naming the file
    f = tmp_path / "rows.json"
    f.write_text("[" * DEEP + "]" * DEEP)
    with pytest.raises(GPTError, match=rf"^{f}: nested too deeply .*a JSON array of records"):
        read_json_records(f, FORMATS["alpaca"], "alpaca", BadRows("skip", "alpaca"))


def test_a_misspelt_key_in_our_config_json_names_the_nearest(made, tmp_path):
    d = copy_of(made["model"], tmp_path / "m")
    raw = json.loads((d / "config.json").read_text())
    raw["n_layr"] = raw.pop("n_layer")
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(GPTError) as e:
        load_model(d)
    assert one_line(str(e.value)) == (
        f"{d / 'config.json'} has an unknown key 'n_layr' (did you mean 'n_layer'?); fix its name, or re-export "
        "the model (configs/model/*.yaml list the settings)"
    )
    # the run's record inside it: a misspelt "task" was silently dropped (template=auto then prompted bare)
    raw["n_layer"] = raw.pop("n_layr")
    raw["gpt"] = {"step": 3, "taks": TASK}
    (d / "config.json").write_text(json.dumps(raw))
    for load in (load_model, finetuned_record):
        with pytest.raises(GPTError) as e:
            load(d)
        assert one_line(str(e.value)).startswith(
            f"{d / 'config.json'}'s 'gpt' entry has an unknown key 'taks' (did you mean 'task'?); "
        )
    raw["gpt"] = {"step": 3, "task": {**TASK, "tempalte": "Q: {input}"}}
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(GPTError, match=r"task entry has an unknown key 'tempalte' \(did you mean 'template'\?\)"):
        load_model(d)
    raw["gpt"] = {"step": 3, "task": TASK}
    (d / "config.json").write_text(json.dumps(raw))
    assert load_model(d)[0].config.n_layer == 1 and finetuned_record(d)["task"] == TASK


def test_a_misspelt_key_through_the_real_script(made, tmp_path):
    d = copy_of(made["model"], tmp_path / "m")
    raw = json.loads((d / "config.json").read_text())
    raw["n_embed"] = raw.pop("n_embd")
    (d / "config.json").write_text(json.dumps(raw))
    proc = run_cli("sample.py", f"ckpt={d}", "prompt=RO", "max_new_tokens=4", "device=cpu", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert_user_error(proc, "has an unknown key 'n_embed' (did you mean 'n_embd'?)")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_misspelt_key_in_the_adapter_record(made, tmp_path):
    a = copy_of(made["adapter"], tmp_path / "a")
    good = json.loads((a / "gpt_adapter.json").read_text())
    for record, needle in (
        ({**good, "decodnig": {}}, "gpt_adapter.json has an unknown key 'decodnig' (did you mean 'decoding'?)"),
        (
            {**good, "base": {**good["base"], "sha": "0"}},
            "base entry has an unknown key 'sha' (did you mean 'sha256'?)",
        ),
        (
            {**good, "task": {**good["task"], "stops": []}},
            "task entry has an unknown key 'stops' (did you mean 'stop'?)",
        ),
        ({**good, "task": {**good["task"], "chat_template": 3}}, "'chat_template' must be text or null (got a number)"),
        ({**good, "step": -1}, "'step' must be a whole number >= 0 (got -1)"),
        ([good], "does not record the adapter's base model"),
    ):
        (a / "gpt_adapter.json").write_text(json.dumps(record))
        with pytest.raises(GPTError) as e:
            read_adapter_record(a)
        assert needle in one_line(str(e.value))
    (a / "gpt_adapter.json").write_text(json.dumps(good))
    assert read_adapter_record(a)["task"] == TASK


def test_peft_adapter_config_fields_of_another_type_or_turned_on(made, tmp_path):
    """adapter_config.json is PEFT's: its fields of a wrong type were AttributeErrors inside PEFT, and a LoRA
    feature finetune.py never writes (megatron_config imports the module megatron_core names) is refused."""
    a = copy_of(made["adapter"], tmp_path / "a")
    good = json.loads((a / "adapter_config.json").read_text())
    for change, needle in (
        ({"bias": None}, "adapter_config.json: bias must be 'none' (got None)"),
        ({"lora_dropout": 0.1}, None),  # another value of a setting finetune.py has: read
        ({"rank_pattern": None}, "rank_pattern=None is not the value finetune.py writes ({}: a PEFT feature"),
        ({"megatron_config": {"x": 1}, "megatron_core": "os"}, "megatron_config={'x': 1} is not the value"),
        ({"target_modules": [1]}, "target_modules must be a list of module names (got [1])"),
        ({"r": 0}, "r must be a positive whole number (got 0)"),
    ):
        (a / "adapter_config.json").write_text(json.dumps({**good, **change}))
        if needle is None:
            assert load_adapter(a)[0].peft_config["default"].r == 2
            continue
        with pytest.raises(GPTError) as e:
            load_adapter(a)
        assert needle in one_line(str(e.value))
    (a / "adapter_config.json").write_text("[" * DEEP + "]" * DEEP)
    with pytest.raises(GPTError, match=r"truncated or corrupt adapter \(RecursionError: adapter_config.json: nested"):
        load_adapter(a)


def test_a_damaged_token_store_meta_json(made, tmp_path):
    s = copy_of(made["store"], tmp_path / "s")
    good = json.loads((s / "meta.json").read_text())
    for meta, needle in (
        ([good], "meta.json: holds an array where an object belongs"),
        ({**good, "dtype": "float64"}, "'dtype' must be one of ['uint16', 'uint32']"),
        ({**good, "n_train": 101}, "0 <= n_train <= n_tokens"),
        ({**good, "n_tokens": 50, "n_train": 40}, "tokens.bin does not hold the 50 tokens"),
    ):
        (s / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(GPTError) as e:
            TokenStore(s)
        assert needle in one_line(str(e.value)) and f"delete {s} (a cached token store" in str(e.value)
    (s / "meta.json").write_text(json.dumps(good))
    assert len(TokenStore(s).tokens("train")) == 90


def test_the_shared_reader_says_what_is_wrong_in_one_line(tmp_path):
    cases = {
        b"{x": "not valid JSON (Expecting property name enclosed in double quotes at line 1 column 2)",
        b"\xff{}": "not UTF-8 text (bad byte at offset 0)",
        b"[1]": "holds an array where an object belongs",
        b'"text"': "holds a string where an object belongs",
        b"1" * 5000: "not valid JSON (a number longer than Python's 4300-digit limit)",
        b'{"a": "\\ud800"}': "holds a string that is not Unicode text",
        b"[" * DEEP + b"]" * DEEP: "nested too deeply",
    }
    for text, needle in cases.items():
        f = tmp_path / "f.json"
        f.write_bytes(text)
        with pytest.raises(GPTError) as e:
            read_json(f, "do this")
        assert one_line(str(e.value)).startswith(f"{f}: {needle}") and str(e.value).endswith("; do this")
    with pytest.raises(GPTError, match=r"^cannot read .* \(Is a directory\); do this$"):
        read_json(tmp_path, "do this")
    f.write_text('\ufeff{"a": 1}')
    assert read_json(f, "x") == {"a": 1}
    assert loads_json('\ufeff{"a": [1]}', "w", "x") == {"a": [1]}  # a byte-order mark is no mistake


# -- the property: any shape, through the real loaders -----------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
)


def paths(node, prefix=()):
    """Every place in a JSON value: the keys / indices that lead there."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield (*prefix, key)
        yield from paths(child, (*prefix, key))


def changed(valid, path, value=None, drop=False):
    out = copy.deepcopy(valid)
    parent = out
    for key in path[:-1]:
        parent = parent[key]
    if drop:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return out


def added(valid, key, value):
    """`valid` with one more key (an object) or item (an array)."""
    return [*valid, value] if isinstance(valid, list) else {**valid, key: value}


def shapes(valid) -> st.SearchStrategy:
    """Text for a file that should hold `valid`: any JSON value, `valid` with one field replaced by any value or
    dropped or a key (an item) added, nesting of any depth, or not JSON at all."""
    where = sorted(paths(valid), key=repr)
    return st.one_of(
        values.map(json.dumps),
        st.tuples(st.sampled_from(where), values).map(lambda pv: json.dumps(changed(valid, *pv))),
        st.sampled_from(where).map(lambda p: json.dumps(changed(valid, p, drop=True))),
        st.tuples(st.text(max_size=10), values).map(lambda kv: json.dumps(added(valid, *kv))),
        st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
        st.text(max_size=30),
    )


def outcome(load) -> str:
    """'ok', or the one-line message of a GPTError; any other exception fails the property."""
    try:
        load()
    except GPTError as e:
        return one_line(str(e))
    return "ok"


PROPERTY = settings(
    max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def property_test(file_kind: str, valid_of, load_with):
    """A test: `file_kind`'s file in a copy of `made`'s directory, written with each shape, then loaded."""

    @PROPERTY
    @given(data=st.data())
    def test(made, tmp_path, data):
        d, name = load_with(made, tmp_path, None)
        valid = valid_of(made)  # from the untouched original: the same for every example
        text = data.draw(shapes(valid), label=file_kind)
        (d / name).write_text(text, encoding="utf-8", errors="surrogatepass")
        result = outcome(lambda: load_with(made, tmp_path, d))
        if text == json.dumps(valid):
            assert result == "ok"

    test.__name__ = f"test_any_shape_of_{file_kind}_loads_or_is_one_line"
    return test


def _model_loader(name):
    def load(made, tmp_path, d):
        if d is None:  # the directory to write into (made once per test)
            target = tmp_path / "m"
            return (target if target.is_dir() else copy_of(made["model"], target)), name
        if name == "config.json":
            model, _ = load_model(d)
            assert model.config.vocab_size == made["tok"].vocab_size
            finetuned_record(d)
        else:
            ChatTemplate.for_model(d)([{"role": "user", "content": "hi"}])
            tokenizer_from_hf(d, {}, made["tok"].vocab_size)

    return load


def _adapter_loader(name):
    def load(made, tmp_path, d):
        if d is None:
            target = tmp_path / "a"
            return (target if target.is_dir() else copy_of(made["adapter"], target)), name
        if name == "gpt_adapter.json":
            read_adapter_record(d)
            template, stops = prompt_template(OmegaConf.create({"adapter": str(d), "template": "auto", "stop": []}))
            assert isinstance(template("x"), str) and all(isinstance(s, str) for s in stops)
        load_adapter(d, made["model"])

    return load


def _store_loader(made, tmp_path, d):
    if d is None:
        target = tmp_path / "s"
        return (target if target.is_dir() else copy_of(made["store"], target)), "meta.json"
    store = warn_unknown(TokenStore(d))
    assert len(store.tokens("train")) + len(store.tokens("valid")) == store.meta["n_tokens"]


def _rows_loader(fmt, name):
    def load(made, tmp_path, d):
        if d is None:
            d = tmp_path / "rows"
            d.mkdir(exist_ok=True)
            return d, name
        template = "{instruction}\n{input}\n" if fmt == "alpaca" else "{input}"
        task = TaskDataModule(
            name="t",
            format=fmt,
            template=template,
            tokenizer=made["tok"],
            block_size=32,
            train=str(d / name),
            valid=str(d / name),
        )
        task.prepare_data()
        assert task.stats["train"]["rows"] >= 1

    return load


def _rows_valid(row, many):
    return lambda made: [row, row] if many else row


@pytest.fixture(autouse=True)
def _quiet_gpt_logs():
    """The warnings of tokenizing odd rows say nothing here; the level is put back for the other test files
    (set at import, it silenced gpt's log records for every test collected after this file)."""
    logger = logging.getLogger("gpt")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


test_config_json = property_test(
    "config_json", lambda made: json.loads((made["model"] / "config.json").read_text()), _model_loader("config.json")
)
test_tokenizer_config_json = property_test(
    "tokenizer_config_json",
    lambda made: json.loads((made["model"] / "tokenizer_config.json").read_text()),
    _model_loader("tokenizer_config.json"),
)
test_gpt_adapter_json = property_test(
    "gpt_adapter_json",
    lambda made: json.loads((made["adapter"] / "gpt_adapter.json").read_text()),
    _adapter_loader("gpt_adapter.json"),
)
test_adapter_config_json = property_test(
    "adapter_config_json",
    lambda made: json.loads((made["adapter"] / "adapter_config.json").read_text()),
    _adapter_loader("adapter_config.json"),
)
test_meta_json = property_test(
    "meta_json", lambda made: json.loads((made["store"] / "meta.json").read_text()), _store_loader
)
test_chat_jsonl_row = property_test("chat_jsonl_row", _rows_valid(CHAT_ROW, False), _rows_loader("chat", "c.jsonl"))
test_alpaca_jsonl_row = property_test(
    "alpaca_jsonl_row", _rows_valid(ALPACA_ROW, False), _rows_loader("alpaca", "a.jsonl")
)
test_alpaca_json_array = property_test(
    "alpaca_json_array", _rows_valid(ALPACA_ROW, True), _rows_loader("alpaca", "a.json")
)
