"""Whole training runs, ours against nanoGPT's own code, in one run on this machine.

    NANOGPT_DIR=~/nanoGPT python bench/recipe.py             # the char recipe for this device, 2 runs each
    NANOGPT_DIR=~/nanoGPT python bench/recipe.py --isa avx2  # as an AVX2-only CPU runs it (see bench.py --isa)
    NANOGPT_DIR=~/nanoGPT python bench/recipe.py --experiment shakespeare_char_fast_cpu   # one recipe of ours

The figure is what a user waits for: the wall time of the whole command, start-up, evaluations and saving
included, the time from launch to the best val loss printed, and the time from launch to the first val loss at or
below nanoGPT's final one in the same run (the quality bar), each against nanoGPT's whole run. CPU: `train.py
experiment=shakespeare_char_cpu` (and the fast recipe, `shakespeare_char_fast_cpu`) against nanoGPT's README CPU
command (4L/4H/128, block 64, batch 12, 2000 iters, `--compile=False`, fp32); CUDA:
`experiment=shakespeare_char_gpu` against `config/train_shakespeare_char.py` as it ships (compile, bf16).
nanoGPT is not part of this project and is never downloaded by it: NANOGPT_DIR names a checkout of
karpathy/nanoGPT (`git clone https://github.com/karpathy/nanoGPT`), copied into a temporary directory with its
Shakespeare-char data written there from our copy of Tiny Shakespeare (what its prepare.py writes). Without
NANOGPT_DIR only ours runs. Runs take turns (ours, nanoGPT, nanoGPT, ours, ...) so that a drifting machine
hits both alike; figures are medians. Results: bench/results/<host>-<date>-recipe[-avx2].json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pickle
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.isa import ISA_CHOICES, isa_env  # noqa: E402

# nanoGPT README's CPU command for Shakespeare-char (fp32 on a CPU: its autocast context is CPU-off)
NANO_CPU = [
    "--device=cpu",
    "--compile=False",
    "--eval_iters=20",
    "--log_interval=1",
    "--block_size=64",
    "--batch_size=12",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--max_iters=2000",
    "--lr_decay_iters=2000",
    "--dropout=0.0",
]
OURS_VAL = re.compile(r"(?:val/loss|: val loss) ([0-9.]+)")  # progress lines, and the final "step N: val loss X"
NANO_VAL = re.compile(r"val loss ([0-9.]+)")


def prepare_nanogpt(src: Path, dest: Path) -> Path:
    """A copy of the nanoGPT checkout with data/shakespeare_char/{train,val}.bin and meta.pkl, as its
    prepare.py writes them (sorted characters, uint16 ids, the first 90% for training)."""
    import numpy as np

    from gpt.datafiles import resolve_files

    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".git", "out*"))
    text = resolve_files(relpath="tinyshakespeare/input.txt", name="shakespeare_char")[0].read_text()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = dest / "data" / "shakespeare_char"
    data.mkdir(parents=True, exist_ok=True)
    n = int(0.9 * len(text))
    np.array([stoi[c] for c in text[:n]], dtype=np.uint16).tofile(data / "train.bin")
    np.array([stoi[c] for c in text[n:]], dtype=np.uint16).tofile(data / "val.bin")
    with open(data / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    return dest


def timed_run(cmd: list[str], cwd: Path, env: dict, val_re: re.Pattern) -> dict:
    """Run a whole training command; its wall time, and when (seconds after launch) each val loss appeared."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    vals, tail = [], []
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-20:]
        m = val_re.search(line)
        if m and (not vals or float(m.group(1)) != vals[-1][1]):  # ours repeats the last val loss on each line
            vals.append((round(time.perf_counter() - t0, 1), float(m.group(1))))
    proc.wait()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": tail[-1] if tail else f"exit {proc.returncode}", "cmd": cmd}
    best = min(vals, key=lambda v: v[1]) if vals else (None, None)
    return {
        "wall_s": round(wall, 1),
        "final_val": vals[-1][1] if vals else None,
        "best_val": best[1],
        "best_val_at_s": best[0],
        "vals": vals,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2, help="runs per contender (they take turns)")
    ap.add_argument("--isa", choices=ISA_CHOICES, default="native", help="avx2: run as an AVX2-only CPU would")
    ap.add_argument(
        "--experiment",
        action="append",
        help="our recipe(s) to run (repeat the option for several); default: the device's default recipe "
        "and the fast one (shakespeare_char_cpu and shakespeare_char_fast_cpu on a CPU)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    env = isa_env(args.isa)
    experiments = args.experiment or (
        ["shakespeare_char_gpu"] if cuda else ["shakespeare_char_cpu", "shakespeare_char_fast_cpu"]
    )
    experiment = ",".join(experiments)
    nano_src = os.environ.get("NANOGPT_DIR")
    contenders = experiments + (["nanogpt"] if nano_src else [])
    if not nano_src:
        print("nanoGPT: skipped (set NANOGPT_DIR to a karpathy/nanoGPT checkout to run it beside ours)", flush=True)
    results: dict[str, list] = {c: [] for c in contenders}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        nano = prepare_nanogpt(Path(nano_src).expanduser(), tmp / "nanogpt") if nano_src else None
        order = [c for i in range(args.runs) for c in (contenders if i % 2 == 0 else contenders[::-1])]
        for i, who in enumerate(order):
            print(f"run {i + 1}/{len(order)}: {who} ...", flush=True)
            if who != "nanogpt":
                cmd = [sys.executable, "train.py", f"experiment={who}", f"hydra.run.dir={tmp / f'ours{i}'}"]
                r = timed_run(cmd, ROOT, env, OURS_VAL)
            else:
                extra = NANO_CPU if not cuda else []
                cmd = [
                    sys.executable,
                    "train.py",
                    "config/train_shakespeare_char.py",
                    *extra,
                    f"--out_dir={tmp / f'n{i}'}",
                ]
                r = timed_run(cmd, nano, env, NANO_VAL)
            print(f"  {json.dumps({k: v for k, v in r.items() if k != 'vals'})}", flush=True)
            results[who].append(r)

    summary = {}
    for who, rs in results.items():
        ok = [r for r in rs if "error" not in r]
        if ok:
            summary[who] = {
                "wall_s": statistics.median(r["wall_s"] for r in ok),
                "best_val_at_s": statistics.median(r["best_val_at_s"] for r in ok if r["best_val_at_s"] is not None),
                "final_val": statistics.median(r["final_val"] for r in ok),
                "best_val": statistics.median(r["best_val"] for r in ok),
            }
    # The quality bar: nanoGPT's final val loss in this run. Ours "reaches" it at the first val loss printed at or
    # below it (seconds after launch); a run that never does has no such time.
    target = summary.get("nanogpt", {}).get("final_val")
    for who in experiments:
        if target is not None and who in summary:
            times = [next((t for t, v in r["vals"] if v <= target), None) for r in results[who] if "error" not in r]
            summary[who]["reached_target_runs"] = sum(t is not None for t in times)
            summary[who]["to_target_s"] = statistics.median(t for t in times) if None not in times else None
    print(f"\n{experiment} ({'cuda' if cuda else 'cpu'}, isa {args.isa}): whole run / launch to best val")
    nano = summary.get("nanogpt")
    for who, s in summary.items():
        line = f"  {who:<26} {s['wall_s']:7.1f} s / {s['best_val_at_s']:6.1f} s   best val {s['best_val']:.4f}"
        if who != "nanogpt" and nano:
            whole, to_best = s["wall_s"] / nano["wall_s"], s["best_val_at_s"] / nano["best_val_at_s"]
            line += f"   vs nanoGPT: whole {whole:.2f}x, to best {to_best:.2f}x"
            to = s.get("to_target_s")
            line += (
                f", to nanoGPT's final {target:.4f}: {to:.1f} s = {to / nano['wall_s']:.2f}x its whole run"
                if to is not None
                else f", nanoGPT's final {target:.4f} not reached"
            )
        print(line)
    suffix = "-recipe" + ("" if args.isa == "native" else f"-{args.isa}")
    out = (
        Path(args.out)
        if args.out
        else ROOT / "bench" / "results" / f"{socket.gethostname()}-{dt.date.today()}{suffix}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "isa": args.isa,
        "env": env_delta(env),
        "device": "cuda" if cuda else "cpu",
        "torch": torch.__version__,
        "experiment": experiment,
        "summary": summary,
        "runs": results,
    }
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


def env_delta(env: dict) -> dict:
    return {k: v for k, v in env.items() if os.environ.get(k) != v}


if __name__ == "__main__":
    main()
