"""Nothing we are handed deletes a user's files: `--force` (import-hf, export-hf) replaces only a directory that
import-hf or export-hf wrote (its `.gpt-model` marker lists the files; or one of our model directories from before
the marker), never through a symbolic link, never a file we did not write. Every refusal is one line, exit 2,
and every byte on disk as it was."""

import json
import os

import pytest
import torch
from conftest import run_cli
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from gpt.checkpoint import save_model_dir
from gpt.config import GPTConfig
from gpt.convert import main
from gpt.model import GPT
from gpt.tokenizer import EOS, Tokenizer

TEXT = "It is the east, and Juliet is the sun. Arise, fair sun, and kill the envious moon.\n" * 4


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_bpe(iter([[TEXT]]), vocab_size=290, show_progress=False)


@pytest.fixture(scope="module")
def ours(tok, tmp_path_factory):
    """Two tiny models of ours (different weights), as train.py exports them."""
    root = tmp_path_factory.mktemp("ours")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = GPT(GPTConfig(block_size=16, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16))
        paths.append(save_model_dir(model, tok, root / f"m{seed}"))
    return paths


@pytest.fixture(scope="module")
def hf(tok, tmp_path_factory):
    """A tiny Hugging Face GPT-2 directory, as transformers' save_pretrained writes it."""
    path = tmp_path_factory.mktemp("hf") / "gpt2"
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=tok.vocab_size, n_positions=16, bos_token_id=tok.eos_id
    )
    config.eos_token_id = tok.eos_id
    GPT2LMHeadModel(config).save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok.hf, eos_token=EOS, bos_token=EOS).save_pretrained(path)
    return path


def snapshot(root):
    """Every entry under `root` (links as links, not followed): its kind and bytes or target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = ("dir", None)
            else:
                with open(p, "rb") as f:
                    out[rel] = ("file", f.read())
    return out


def refused(argv, capsys, *needles):
    """main(argv) exits with status 2 and one `error:` line holding every needle; returns the line."""
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def user_dir(path, files):
    path.mkdir(parents=True)
    for name, content in files.items():
        (path / name).write_bytes(content)
    return path


FOREIGN = {
    "config only": {"config.json": b'{"theme": "dark", "font_size": 14}\n'},
    "config and notes": {"config.json": b'{"theme": "dark"}\n', "notes.txt": b"my notes\n", "data.csv": b"a,b\n1,2\n"},
    # a user's own model directory that transformers wrote: not ours either, whatever its files are called
    "transformers model": None,
}


def verb_argv(verb, ours, hf, out):
    return ["export-hf", ours[0], out, "--force"] if verb == "export-hf" else ["import-hf", hf, out, "--force"]


@pytest.mark.parametrize("verb", ["export-hf", "import-hf"])
@pytest.mark.parametrize("kind", FOREIGN)
def test_force_never_replaces_a_user_directory(verb, kind, ours, hf, tmp_path, capsys):
    if FOREIGN[kind] is None:
        target = user_dir(tmp_path / "mine" / "target", {p.name: p.read_bytes() for p in hf.iterdir()})
    else:
        target = user_dir(tmp_path / "mine" / "target", FOREIGN[kind])
    before = snapshot(tmp_path / "mine")
    refused(verb_argv(verb, ours, hf, target), capsys, str(target), "not a model directory this tool wrote", "--force")
    assert snapshot(tmp_path / "mine") == before  # every byte, and no temporary directory beside it


@pytest.mark.parametrize("verb", ["export-hf", "import-hf"])
@pytest.mark.parametrize("force", [True, False])
@pytest.mark.parametrize("what", ["user dir", "our export", "nothing"])
def test_a_symlinked_output_is_refused_by_name_and_its_target_untouched(verb, force, what, ours, hf, tmp_path, capsys):
    target = tmp_path / "real"
    if what == "user dir":
        user_dir(target, FOREIGN["config and notes"])
    elif what == "our export":
        main(["export-hf", str(ours[0]), str(target)])
        capsys.readouterr()
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    before = snapshot(tmp_path)
    argv = verb_argv(verb, ours, hf, link)[: None if force else -1]
    refused(argv, capsys, f"{link} is a symbolic link (to {target})")
    assert snapshot(tmp_path) == before
    assert not os.path.lexists(target) if what == "nothing" else target.is_dir()


@pytest.mark.parametrize("first", ["export-hf", "import-hf"])
@pytest.mark.parametrize("second", ["export-hf", "import-hf"])
def test_a_directory_we_wrote_is_replaced_by_force(first, second, ours, hf, tmp_path, capsys):
    out = tmp_path / "out"
    main([str(a) for a in verb_argv(first, ours, hf, out)[:-1]])
    record = json.loads((out / ".gpt-model").read_text())
    assert record["written_by"] == "gpt.convert"
    assert set(record["files"]) == {p.name for p in out.iterdir()} - {".gpt-model"}
    argv = ["export-hf", ours[1], out, "--force"] if second == "export-hf" else ["import-hf", hf, out, "--force"]
    main([str(a) for a in argv])
    capsys.readouterr()
    config = json.loads((out / "config.json").read_text())
    assert config.get("model_type") == ("gpt2" if second == "export-hf" else "gpt")
    expected = (
        {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
        if second == "export-hf"
        else {"config.json", "model.safetensors", "tokenizer.json"}
    )
    assert {p.name for p in out.iterdir()} == expected | {".gpt-model"}
    assert json.loads((out / ".gpt-model").read_text())["files"] == sorted(expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .old/.new/.tmp left beside it


def test_force_on_our_directory_keeps_a_file_we_did_not_write(ours, tmp_path, capsys):
    out = tmp_path / "out"
    main(["export-hf", str(ours[0]), str(out)])
    (out / "notes.txt").write_bytes(b"written by hand\n")
    (out / "eval").mkdir()
    (out / "eval" / "scores.json").write_bytes(b"{}")
    before = snapshot(tmp_path)
    refused(["export-hf", ours[1], out, "--force"], capsys, "holds eval/, notes.txt: files this tool did not write")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "marker",
    [
        b"not json",
        b'{"written_by": "someone else", "files": ["config.json"]}',
        b'{"written_by": "gpt.convert", "files": "config.json"}',
    ],
)
def test_a_damaged_or_foreign_marker_proves_nothing(marker, ours, tmp_path, capsys):
    target = user_dir(tmp_path / "target", {"config.json": b"{}", ".gpt-model": marker})
    before = snapshot(tmp_path)
    refused(["export-hf", ours[0], target, "--force"], capsys, "not a model directory this tool wrote")
    assert snapshot(tmp_path) == before


def test_directories_from_before_the_marker(ours, hf, tmp_path, capsys):
    """Ours without a marker (import-hf's or train.py's three files, our config.json) is replaced; an export-hf
    directory without one cannot be told from transformers' save_pretrained, so it is refused."""
    old = tmp_path / "old"
    save_model_dir(
        GPT(GPTConfig(block_size=16, vocab_size=290, n_layer=1, n_head=2, n_embd=16)), Tokenizer.char_level("ab"), old
    )
    assert {p.name for p in old.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json"}
    main(["import-hf", str(hf), str(old), "--force"])
    assert json.loads((old / "config.json").read_text())["gpt"]["converted_from"]["format"] == "huggingface-gpt2"

    exported = tmp_path / "exported"
    main(["export-hf", str(ours[0]), str(exported)])
    (exported / ".gpt-model").unlink()  # as export-hf wrote it before the marker
    before = snapshot(tmp_path)
    refused(["export-hf", ours[1], exported, "--force"], capsys, "not a model directory this tool wrote")
    assert snapshot(tmp_path) == before


def test_the_real_command_refuses_in_one_line(ours, tmp_path):
    target = user_dir(tmp_path / "target", FOREIGN["config and notes"])
    link = tmp_path / "link"
    link.symlink_to(target)
    before = snapshot(tmp_path)
    for out, needle in ((target, "not a model directory this tool wrote"), (link, "is a symbolic link")):
        proc = run_cli("-m gpt.convert", "export-hf", str(ours[0]), str(out), "--force")
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and needle in proc.stderr
    assert snapshot(tmp_path) == before


# -- the other replace path a user's file could meet: a run's exported model directories ---------------


def test_a_run_never_exports_through_a_symlink(ours, tok, tmp_path):
    """ExportingCheckpoint replaces checkpoints/best/ at each new best; planted as a link to a user's folder,
    it is refused by name and the folder keeps every byte. A real best/ of the run is replaced as usual."""
    from types import SimpleNamespace

    from gpt.callbacks import ExportingCheckpoint
    from gpt.errors import GPTError

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16))
    trainer = SimpleNamespace(
        save_checkpoint=lambda path, weights_only=False: open(path, "wb").close(),
        global_step=3,
        is_global_zero=True,
        loggers=[],
        strategy=object(),
        lightning_module=SimpleNamespace(export_fn=lambda path: save_model_dir(model, tok, path)),
    )
    callback = ExportingCheckpoint(dirpath=str(ckpts))
    callback._save_checkpoint(trainer, str(ckpts / "best.ckpt"))
    first = (ckpts / "best" / "model.safetensors").read_bytes()
    with torch.no_grad():
        model.transformer.wte.weight.add_(1.0)
    callback._save_checkpoint(trainer, str(ckpts / "best.ckpt"))  # a new best: replaced
    assert (ckpts / "best" / "model.safetensors").read_bytes() != first

    mine = user_dir(tmp_path / "mine", FOREIGN["config and notes"])
    (ckpts / "last").symlink_to(mine, target_is_directory=True)
    before = snapshot(tmp_path)
    with pytest.raises(GPTError, match=f"{ckpts / 'last'} is a symbolic link \\(to {mine}\\)"):
        callback._save_checkpoint(trainer, str(ckpts / "last.ckpt"))
    after = snapshot(tmp_path)
    assert after.pop("checkpoints/last.ckpt") == ("file", b"")  # Lightning's own file, written before the export
    assert after == before
