"""Never delete what is not ours, and no traceback for any file or value a user can hand us.

Data loss: our temporary, swap and pointer names (`.X.tmp-*`, `.X.new`, `.X.old`, `latest`) beside a user's
files of the same look; every file that was there must come out byte-identical. Tracebacks: a table that
walks every key of every config (configs/*.yaml and each option of their groups) and every field of
config.json / gpt_adapter.json / the .ckpt record with wrong types, NaN, negative, huge and missing values,
in-process (fast); a handful of the same mistakes through the real entry scripts.
"""

import copy
import functools
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY, assert_user_error, run_cli
from omegaconf import OmegaConf

from gpt.atomic import MARKER, atomic_file, recover_dir
from gpt.checkpoint import load_model, save_model_dir
from gpt.config import GPTConfig
from gpt.errors import GPTError
from gpt.model import GPT
from gpt.tokenizer import Tokenizer

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
DEAD_PID = 2**22 + 12345  # above Linux's pid_max default (4194304): no process has it


def snapshot(*roots: Path) -> dict:
    """Every file and symlink under roots: its bytes (a link: its target)."""
    out = {}
    for root in roots:
        for p in [root, *root.rglob("*")]:
            if p.is_symlink():
                out[p] = ("link", os.readlink(p))
            elif p.is_file() and p.name != ".lock":
                out[p] = p.read_bytes()
    return out


def unchanged(before: dict, roots) -> None:
    after = snapshot(*roots)
    changed = [str(p) for p, v in before.items() if after.get(p) != v]
    assert not changed, changed


def write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def look_alikes(d: Path, name: str) -> None:
    """A user's files whose names look like our temporary and swap names for `name` in d."""
    write(d / f".{name}.old" / "mine.txt", "a user's .old folder")
    write(d / f".{name}.new" / "mine.txt", "a user's .new folder")
    write(d / f".{name}.tmp-1-abc", "a user's file")
    write(d / f".{name}.tmp-{DEAD_PID}-notours", "a user's file with a dead pid")
    write(d / f".{name}.old-{DEAD_PID}-{'0' * 32}" / "mine.txt", "no marker names this suffix")
    write(d / ".other.tmp-1-x", "another file's look-alike")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    tok = Tokenizer.char_level(TEXT)
    path = tmp_path_factory.mktemp("m") / "model"
    save_model_dir(GPT(GPTConfig(block_size=32, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16)), tok, path)
    return path


# -- data loss: the mechanisms, in-process --------------------------------------------------------------


def test_an_export_touches_none_of_the_users_look_alikes(model_dir, tmp_path):
    model, tok = load_model(model_dir)
    look_alikes(tmp_path, "X")
    save_model_dir(model, tok, tmp_path / "X")
    before = {p: v for p, v in snapshot(tmp_path).items() if "/X/" not in str(p)}
    save_model_dir(model, tok, tmp_path / "X")  # a replacement: the .new/.old swap runs
    unchanged(before, [tmp_path])
    assert not (tmp_path / "X" / MARKER).exists()
    assert not [
        p
        for p in tmp_path.iterdir()
        if p.name.startswith(".X.")
        and p.name.split("-")[-1] not in ("abc", "notours", "0" * 32)
        and p.name not in (".X.old", ".X.new")
    ]  # nothing of ours left


def test_recovery_adopts_only_a_marked_new(model_dir, tmp_path):
    """A user's `.X.new` (or our name without our marker) is never renamed to X; ours is."""
    write(tmp_path / ".X.new" / "config.json", "{}")
    write(tmp_path / f".X.new-{DEAD_PID}-{'a' * 32}" / "config.json", "{}")
    assert recover_dir(tmp_path / "X") == tmp_path / "X" and not (tmp_path / "X").exists()
    ours = tmp_path / f".X.new-{DEAD_PID}-{'b' * 32}"
    shutil.copytree(model_dir, ours)
    (ours / MARKER).write_text(f"gpt atomic_dir X {DEAD_PID}-{'b' * 32}\n")
    assert recover_dir(tmp_path / "X") == tmp_path / "X"
    load_model(tmp_path / "X")
    assert (tmp_path / ".X.new" / "config.json").read_text() == "{}"


def test_stale_temp_cleanup_matches_exact_names_only(tmp_path):
    """atomic_file removes a dead writer's temporary of exactly this name (ours: O_EXCL, pid, uuid); a glob
    character in the name is a character, not a pattern."""
    look_alikes(tmp_path, "o*")
    write(tmp_path / f".out.txt.tmp-{DEAD_PID}-{'c' * 32}", "another target's leftover")
    ours = write(tmp_path / f".o*.tmp-{DEAD_PID}-{'d' * 32}", "our dead writer's leftover")
    before = {p: v for p, v in snapshot(tmp_path).items() if p != ours}
    with atomic_file(tmp_path / "o*") as f:
        f.write(b"new")
    unchanged(before, [tmp_path])
    assert not ours.exists() and (tmp_path / "o*").read_bytes() == b"new"


def test_latest_is_replaced_only_when_it_is_our_link(tmp_path):
    from gpt.run import point_latest

    for i, kind in enumerate(("file", "dir", "foreign link")):
        d = tmp_path / kind
        (d / "run1").mkdir(parents=True)
        latest = d / "latest"
        if kind == "file":
            write(latest, "my notes")
        elif kind == "dir":
            write(latest / "x.txt", "mine")
        else:
            os.symlink(str(tmp_path), latest)
        write(d / f".latest.{os.getpid()}", "a user's file with our old temporary name")
        before = snapshot(d)
        point_latest(d / "run1")
        unchanged(before, [d])
        assert os.path.lexists(latest) and (kind != "foreign link" or os.readlink(latest) == str(tmp_path))
    d = tmp_path / "ours"
    (d / "run1").mkdir(parents=True)
    (d / "run2").mkdir()
    point_latest(d / "run1")
    point_latest(d / "run2")
    assert os.readlink(d / "latest") == "run2"
    assert sorted(p.name for p in d.iterdir()) == ["latest", "run1", "run2"]


# -- data loss and text: through the real scripts ---------------------------------------------------------


def test_refused_resume_changes_nothing_and_the_output_name_is_no_glob(model_dir, tmp_path):
    look_alikes(tmp_path, "junk.ckpt")
    write(tmp_path / f".last.ckpt.tmp-{DEAD_PID}-{'e' * 32}", "looks exactly like ours, but no resume was accepted")
    junk = write(tmp_path / "junk.ckpt", "not a checkpoint")
    before = snapshot(tmp_path)
    proc = run_cli("train.py", *TINY, f"hydra.run.dir={tmp_path / 'run'}", f"ckpt_path={junk}")
    assert_user_error(proc, "not a whole checkpoint")
    unchanged(before, [tmp_path])

    out = tmp_path / "out"
    look_alikes(out, "o*")
    write(out / f".other.tmp-{DEAD_PID}-{'f' * 32}", "another file's leftover, alike but for the name")
    before = snapshot(out)
    proc = run_cli(
        "sample.py",
        f"ckpt={model_dir}",
        "max_new_tokens=3",
        "temperature=0",
        f"input_file={write(tmp_path / 'in.txt', 'RO')}",
        f"output_file={out / 'o*'}",
    )
    assert proc.returncode == 0, proc.stderr
    unchanged(before, [out])
    assert (out / "o*").read_text().count("\n") == 1


def test_export_hf_keeps_the_users_look_alikes(model_dir, tmp_path):
    look_alikes(tmp_path, "X")
    before = snapshot(tmp_path)
    proc = run_cli("-m gpt.convert", "export-hf", str(model_dir), str(tmp_path / "X"))
    assert proc.returncode == 0, proc.stderr
    unchanged(before, [tmp_path])


def test_text_that_is_not_text_gets_one_line(model_dir, tmp_path):
    sample = ("sample.py", f"ckpt={model_dir}", "max_new_tokens=3")
    before = snapshot(tmp_path, model_dir)
    cases = [
        ((*sample, "prompt=" + os.fsdecode(b"caf\xe9")), ["not UTF-8 text", "byte 0xe9", "iconv"]),
        ((*sample, "prompt=${foo}"), ["prompt: cannot resolve", "\\${"]),
        ((*sample, "template='Q: {input:d}'"), ["{input:d}", "write {input}"]),
        ((*sample, "~prompt"), ["would remove the setting prompt"]),
        ((*sample, "optim.lr=nan"), ["unknown config key"]),  # sample.py has no optimizer: the typo is the news
        (("train.py", *TINY, f"hydra.run.dir={tmp_path / 'r1'}", "optim.lr=nan"), ["optim.lr must be a finite number"]),
        (("train.py", *TINY, f"hydra.run.dir={tmp_path / 'r2'}", "optim.eps=inf"), ["optim.eps must be a finite"]),
        (
            (
                "train.py",
                *TINY,
                f"hydra.run.dir={tmp_path / 'r3'}",
                "model.vocab_size=1000000000000",
                "data=text",
                f"data.path={write(tmp_path / 'c.txt', TEXT * 5)}",
            ),
            ["GiB", "smaller model"],
        ),
    ]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases.append(((*sample, f"input_file={fifo}", f"output_file={tmp_path / 'o.txt'}"), ["not a regular file"]))
    corpus = write(tmp_path / "utf16.txt", TEXT.encode("utf-16"))
    cases.append(
        (
            ("train.py", *TINY, f"hydra.run.dir={tmp_path / 'r4'}", "data=text", f"data.path={corpus}"),
            ["UTF-16", "iconv -f utf-16"],
        )
    )
    for args, needles in cases:
        assert_user_error(run_cli(*args), *needles)
    unchanged(before, [tmp_path, model_dir])
    # What the escapes mean: \${...} is literal text; a huge max_new_tokens allocates only what is generated.
    proc = run_cli(
        *sample,
        "prompt=\\${x}",
        "max_new_tokens=10000000000",
        "on_context_full=stop",
        "temperature=0",
        "unknown_chars=unk",
    )
    assert proc.returncode == 0 and proc.stdout.startswith("${x}"), proc.stderr


def test_a_corpus_path_with_glob_characters_is_that_file(tmp_path):
    """data.path names a file with [ ] in its name: the literal file wins (the run gets as far as its text)."""
    corpus = write(tmp_path / "c[1].txt", "Too short.")
    proc = run_cli("train.py", *TINY, f"hydra.run.dir={tmp_path / 'run'}", "data=text", f"data.path='{corpus}'")
    assert_user_error(proc, "too short")


# -- the table: every key of every config, every field of our records -------------------------------------

BAD = {
    "word": ("fast", "fast"),
    "nan": ("nan", math.nan),
    "inf": ("inf", math.inf),
    "negative": ("-1", -1),
    "huge": ("1000000000000", 10**12),
    "null": ("null", None),
}


def leaves(node, prefix=""):
    for key, value in node.items():
        full = f"{prefix}{key}"
        if OmegaConf.is_dict(value):
            yield from leaves(value, f"{full}.")
        elif key != "_target_":
            yield full


def compositions():
    """(script, group choices): each script's defaults, then each option of each of its groups once."""
    from gpt.cli import CONFIG_DIR, config_groups

    for script in ("train", "finetune", "sample"):
        yield script, ()
        for group in config_groups(script):
            for option in sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml")):
                yield script, (f"{group}={option}",)


def verb_checks(script: str, cfg, tiny: GPT, tok: Tokenizer) -> None:
    """What each script checks before it does any work (and that needs no files): the same functions."""
    from gpt.errors import check_num_workers, check_seed
    from gpt.generate import check_sampling_args
    from gpt.launch import build
    from gpt.lit import LanguageModel
    from gpt.memory import check_fits_in_memory

    if script == "sample":
        from gpt.sample import check_options, prompt_template

        check_options(cfg)
        if not cfg.get("adapter"):
            prompt_template(cfg)
        return
    check_seed(cfg.seed)
    optim = OmegaConf.to_container(cfg.optim, resolve=True)
    LanguageModel(tiny, tok, **optim)
    if script == "train":
        from gpt.run import check_trainer_settings

        check_trainer_settings(cfg.trainer, cfg.optim.get("decay_steps"))
        config = build(cfg.model)
        config.vocab_size = config.vocab_size or tok.vocab_size
        check_fits_in_memory(config)
        check_num_workers(cfg.data.get("num_workers", 0), "data.num_workers")
        s = cfg.log_samples
        if not isinstance(s.n, int) or s.n < 0:
            raise GPTError(f"log_samples.n must be a whole number >= 0 (got {s.n!r})")
        check_sampling_args(s.max_new_tokens, s.temperature, s.top_k, prefix="log_samples.")
    else:
        from gpt.finetune_options import check_options

        check_options(cfg)
        build(cfg.lora)


def one_line(outcome) -> None:
    assert outcome is None or (isinstance(outcome, str) and outcome and "\n" not in outcome), outcome


def test_every_key_of_every_config_with_bad_values(capsys, tmp_path):
    """Each value of BAD for every leaf key: the command-line check (check_value_types) and then the script's
    own checks either accept it or refuse it with one line; no other exception, nothing written."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    from gpt.cli import CONFIG_DIR, check_value_types, precheck_overrides

    tok = Tokenizer.char_level(TEXT)
    tiny = GPT(GPTConfig(block_size=8, vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=8))
    counts, before, seen, tracebacks = {"accepted": 0, "refused": 0}, snapshot(tmp_path), set(), []
    os.chdir(tmp_path)  # anything written relative to the working directory would show up here
    for script, choices in compositions():
        try:
            with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
                cfg = compose(script, overrides=list(choices))
        except ConfigCompositionException:  # another script's experiment: refused up front (tests/test_cli.py)
            continue
        for key in OmegaConf.missing_keys(cfg):  # what the command line must give (refused up front if not)
            OmegaConf.update(cfg, key, "given")
        base, raw_cfg = copy.deepcopy(cfg), OmegaConf.to_container(cfg, resolve=False)
        for key in leaves(base):
            default = OmegaConf.select(base, key, throw_on_missing=False)
            # a key once per script and type of default: the same setting under another group option is the same
            if key.startswith("hydra") or (script, key, type(default)) in seen:
                continue
            seen.add((script, key, type(default)))
            original = functools.reduce(lambda node, k: node[k], key.split("."), raw_cfg)
            for raw, value in BAD.values():
                OmegaConf.update(cfg, key, value, merge=False)
                outcome = None
                try:
                    override = f"{key}={raw}"
                    rewritten = check_value_types(script, [*choices, override], cfg, base=base).get(override)
                    if rewritten:  # what the command line makes of it: the text as typed, or a one-item list
                        OmegaConf.update(cfg, key, raw if rewritten.startswith(f"{key}='") else [value], merge=False)
                    verb_checks(script, cfg, tiny, tok)
                except SystemExit as e:
                    assert e.code == 2
                    outcome = capsys.readouterr().err.strip().removeprefix("error: ")
                except GPTError as e:
                    outcome = str(e)
                except Exception as e:  # a traceback for the user: collected, all reported at the end
                    tracebacks.append(f"{script} {' '.join(choices)} {key}={raw}: {type(e).__name__}: {e}"[:300])
                finally:
                    OmegaConf.update(cfg, key, original, merge=False)
                one_line(outcome)
                counts["refused" if outcome else "accepted"] += 1
            with pytest.raises(SystemExit):  # "missing": ~key
                precheck_overrides(script, [f"~{key}"])
            one_line(capsys.readouterr().err.strip())
            counts["refused"] += 1
    assert not tracebacks, "\n".join(tracebacks)
    unchanged(before, [tmp_path])
    assert not list(tmp_path.iterdir())
    print(f"config table: {sum(counts.values())} cases, {counts}")
    assert sum(counts.values()) > 500


RECORD_BAD = {
    "word": "fast",
    "nan": math.nan,
    "negative": -1,
    "huge": 10**12,
    "null": None,
    "list": [1],
    "float": 2.5,
    "bool": True,
}


def test_every_field_of_config_json_and_the_ckpt_record(model_dir, tmp_path):
    """config.json: each field with each bad value, and missing; the .ckpt record: each entry missing or of the
    wrong type. load_model either loads or refuses with one line (never builds first); no file changes."""
    from gpt.checkpoint import state_dict_for_saving

    raw = json.loads((model_dir / "config.json").read_text())
    model, tok = load_model(model_dir)
    d = Path(shutil.copytree(model_dir, tmp_path / "m"))
    cases = 0
    for field in [k for k in raw if k != "gpt"]:
        for value in [*RECORD_BAD.values(), "missing"]:
            config = {k: v for k, v in raw.items() if k != field}
            if value != "missing":
                config[field] = value
            (d / "config.json").write_text(json.dumps(config))
            before = snapshot(d)
            try:
                load_model(d)
            except GPTError as e:
                one_line(str(e))
            unchanged(before, [d])
            cases += 1
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in state_dict_for_saving(model).items()},
        "gpt": {"config": model.config.to_dict(), "tokenizer": tok.to_str()},
        "global_step": 1,
    }
    entries = [("gpt",), ("state_dict",), ("gpt", "config"), ("gpt", "tokenizer")]
    for entry in entries:
        for value in [*RECORD_BAD.values(), "missing", "garbage"]:
            record = {**ckpt, "gpt": dict(ckpt["gpt"])}
            parent = record if len(entry) == 1 else record["gpt"]
            if value == "missing":
                del parent[entry[-1]]
            else:
                parent[entry[-1]] = "{not json" if value == "garbage" else value
            torch.save(record, tmp_path / "r.ckpt")
            with pytest.raises(GPTError) as e:
                load_model(tmp_path / "r.ckpt")
            one_line(str(e.value))
            cases += 1
    print(f"record table: {cases} cases")


def test_every_field_of_the_adapter_record(model_dir, tmp_path):
    """gpt_adapter.json: each entry missing or of a wrong type; read it and prompt with it as sample.py does."""
    from gpt.adapter import read_adapter_record
    from gpt.sample import prompt_template

    good = {
        "base": {"path": str(model_dir), "sha256": "0" * 64},
        "task": {
            "name": "t",
            "format": "parallel",
            "template": "Q: {input}\nA:",
            "template_no_input": None,
            "stop": ["\n"],
        },
        "step": 3,
    }
    adapter = tmp_path / "a"
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        write(adapter / f, "{}")
    cases = 0
    for entry in [("base",), ("task",), ("base", "path"), ("base", "sha256"), *[("task", k) for k in good["task"]]]:
        for value in [*RECORD_BAD.values(), "missing", "{input:d}"]:
            record = {**good, "base": dict(good["base"]), "task": dict(good["task"])}
            parent = record if len(entry) == 1 else record[entry[0]]
            if value == "missing":
                del parent[entry[-1]]
            else:
                parent[entry[-1]] = value
            write(adapter / "gpt_adapter.json", json.dumps(record))
            cfg = OmegaConf.create({"adapter": str(adapter), "template": "auto", "stop": []})
            try:
                read_adapter_record(adapter)
                prompt_template(cfg)[0]("x")
            except GPTError as e:
                one_line(str(e))
            cases += 1
    print(f"adapter record table: {cases} cases")
