"""Time to first token of gpt.serve with and without its prefix cache, on prompts that share a long system prompt.

    python bench/prefix_cache.py threads=1      # 6L/384 char model, block 256, a shared prefix of 204 characters
    python bench/prefix_cache.py --requests 8 --layers 2 threads=1   # a quick smoke run

The randomly initialised model of bench/serve_load.py (speed does not depend on the weights), served twice in a
child process: with prefix_cache_tokens=0 (off), then with configs/serve.yaml's setting (on). Every prompt is one
shared "system prompt" of --shared x block characters followed by a question of its own (16-24 characters); the
requests are streaming /v1/completions (max_tokens 8, sampled). TTFT: from sending a request to its first text
chunk. Two warm-up requests first (not counted; with the cache on they leave the system prompt in it, as any first
request does), then --requests one at a time, then the same number from --clients concurrent clients. Writes
bench/results/<host>-<date>-prefix.json (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve_load import ALPHABET, make_model, run_phase, served  # noqa: E402


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=32, help="requests per phase")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients in the second phase")
    p.add_argument("--shared", type=float, default=0.8, help="the shared prefix, as a fraction of the context")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--timeout", type=float, default=900, help="seconds for the whole run")
    p.add_argument("--out", help="the JSON file (default bench/results/<host>-<date>-prefix.json)")
    p.add_argument("server_args", nargs="*", help="more key=value settings for gpt.serve (configs/serve.yaml)")
    args = p.parse_args()
    max_tokens, question = 8, (16, 24)
    shared = int(args.shared * args.block)
    if not 0 < shared <= args.block - question[1] - max_tokens:
        raise SystemExit(
            f"error: --shared {args.shared} leaves no room for a question and {max_tokens} tokens in a context of "
            f"{args.block}; give a smaller fraction"
        )
    rng = random.Random(0)
    system = "".join(rng.choice(ALPHABET[1:]) for _ in range(shared))
    prompts = [
        system + "".join(rng.choice(ALPHABET[1:]) for _ in range(rng.randint(*question)))
        for _ in range(2 + 2 * args.requests)
    ]
    warm, one, many = prompts[:2], prompts[2 : 2 + args.requests], prompts[2 + args.requests :]
    deadline = time.time() + args.timeout
    figures = {
        "what": "TTFT of gpt.serve with and without its prefix cache (bench/prefix_cache.py)",
        "command": " ".join(["python bench/prefix_cache.py", *sys.argv[1:]]),
        "date": dt.date.today().isoformat(),
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "model": f"{args.layers}L/{args.heads}H/{args.width}, block {args.block}, {len(ALPHABET)} chars",
        "shared_prefix_tokens": shared,
        "question_tokens": list(question),
        "max_tokens": max_tokens,
        "server_args": args.server_args,
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(Path(tmp) / "model", args.layers, args.heads, args.width, args.block)
        for name, setting in (("off", ["prefix_cache_tokens=0"]), ("on", [])):
            with served(model_dir, [*setting, *args.server_args], deadline) as url:

                async def phases():
                    await run_phase(url, warm, 1, max_tokens)
                    return {
                        "one_at_a_time": await run_phase(url, one, 1, max_tokens),
                        "concurrent": await run_phase(url, many, args.clients, max_tokens),
                    }

                figures[name] = asyncio.run(asyncio.wait_for(phases(), timeout=max(1.0, deadline - time.time())))
    for phase in ("one_at_a_time", "concurrent"):
        off, on = figures["off"][phase]["ttft_p50_ms"], figures["on"][phase]["ttft_p50_ms"]
        figures[f"ttft_p50_speedup_{phase}"] = round(off / on, 2) if off and on else None
    print(json.dumps(figures, indent=2))
    default = ROOT / "bench" / "results" / f"{socket.gethostname()}-{dt.date.today()}-prefix.json"
    out = Path(args.out) if args.out else default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    errors = sum(figures[name][phase]["errors"] for name in ("off", "on") for phase in ("one_at_a_time", "concurrent"))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
