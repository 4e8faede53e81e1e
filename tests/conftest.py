"""Shared fixtures. The real corpus comes from $GPT_DATA_DIR (CI: ../shared/data) or is downloaded."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolate(tmp_path_factory, monkeypatch):
    # Token stores built by tests go to a per-session cache, never into the user's .cache/ or data dir.
    monkeypatch.setenv("GPT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    """Tiny Shakespeare, resolved the way the named dataset is (GPT_DATA_DIR, else download)."""
    from gpt.data import resolve_files

    return resolve_files(relpath="tinyshakespeare/input.txt",
                         url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                         sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
                         name="shakespeare_char")[0]


def run_cli(script: str, *args: str, env: dict | None = None, cwd: Path = ROOT, timeout: int = 300):
    """Run one of the entry scripts (or `-m package.module`) as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("GPT_VERBOSE", None)
    full_env.pop("HYDRA_FULL_ERROR", None)
    command = ["-m", script[3:]] if script.startswith("-m ") else [str(ROOT / script)]
    return subprocess.run([sys.executable, *command, *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def assert_user_error(proc, *needles: str):
    """Non-zero exit, one `error:` line naming the problem, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle.lower() in lines[0].lower(), lines[0]
    return lines[0]
