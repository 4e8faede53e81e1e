"""Load test of the OpenAI-compatible server (gpt/serve.py): batched concurrent clients vs one at a time.

    python bench/serve_load.py     # 6L/384 char model, 16 clients x 8 requests, then 128 one by one
    python bench/serve_load.py --clients 4 --requests 4 --max-tokens 32 --layers 2   # a quick smoke run

Makes a randomly initialised model of the given size (a `model=baby`-like shape with a 65-character vocabulary:
speed does not depend on the weights), starts `python -m gpt.serve` on a free loopback port in a child process,
and sends streaming /v1/completions requests (sampled, stop_at_eos=false so every request generates exactly
--max-tokens tokens). Phase 1: --clients concurrent clients, each sending --requests requests back to back.
Phase 2: the same requests one at a time (their prompts again: with the server's prefix cache on, partly read
from it; `cached_tokens` counts those tokens, prefix_cache_tokens=0 turns it off). Reports aggregate generated
tokens/s, time to first token (p50/p99) and per-request latency (p50/p99), and the errors (any non-200 answer or
a stream without [DONE]). The server is stopped (SIGTERM) at the end, and the whole run is bounded by --timeout
seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ALPHABET = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # tiny Shakespeare's 65 characters


def make_model(path: Path, layers: int, heads: int, width: int, block: int) -> Path:
    import torch

    from gpt.checkpoint import save_model_dir
    from gpt.config import GPTConfig
    from gpt.model import GPT
    from gpt.tokenizer import Tokenizer

    tok = Tokenizer.char_level(ALPHABET)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=block, vocab_size=tok.vocab_size, n_layer=layers, n_head=heads, n_embd=width))
    return save_model_dir(model, tok, path)


@contextlib.contextmanager
def served(model_dir: Path, server_args: list[str], deadline: float):
    """`python -m gpt.serve` on the model, in a child process on a free loopback port, until the block ends (then
    SIGTERM); yields its base url once /health answers."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpt.serve",
            f"ckpt={model_dir}",
            f"port={port}",
            "stop_at_eos=false",
            "log_level=warning",
            *server_args,
        ],
        cwd=ROOT,
        env=env,
    )
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit("error: the server did not start")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


async def one_request(http, prompt: str, seed: int, max_tokens: int) -> dict:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first, tokens, cached, done = None, 0, 0, False
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            data = json.loads(line[6:])
            if "error" in data:
                return {"error": data["error"]["message"]}
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
                cached = data["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
            elif first is None and data["choices"] and data["choices"][0]["text"]:
                first = time.perf_counter() - start
    if not done:
        return {"error": "the stream ended without [DONE]"}
    return {"ttft": first, "latency": time.perf_counter() - start, "tokens": tokens, "cached": cached}


async def run_phase(url: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    import httpx

    results: list[dict] = []
    queues = [list(enumerate(prompts))[i::clients] for i in range(clients)]

    async def client(work):
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            for seed, prompt in work:
                try:
                    results.append(await one_request(http, prompt, seed, max_tokens))
                except Exception as e:  # a refused or dropped connection counts as an error, not a crash
                    results.append({"error": f"{type(e).__name__}: {e}"})

    start = time.perf_counter()
    await asyncio.gather(*(client(w) for w in queues))
    wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    latency = [r["latency"] for r in ok]
    return {
        "clients": clients,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "first_errors": [r["error"] for r in results if "error" in r][:3],
        "wall_s": round(wall, 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "cached_tokens": sum(r["cached"] for r in ok),  # prompt tokens read from the prefix cache
        "ttft_p50_ms": round(1000 * percentile(ttft, 50), 1) if ttft else None,
        "ttft_p99_ms": round(1000 * percentile(ttft, 99), 1) if ttft else None,
        "latency_p50_s": round(percentile(latency, 50), 3) if latency else None,
        "latency_p99_s": round(percentile(latency, 99), 3) if latency else None,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=8, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--timeout", type=float, default=900, help="seconds for the whole run")
    p.add_argument("--out", help="also write the figures to this JSON file")
    p.add_argument("server_args", nargs="*", help="more key=value settings for gpt.serve (configs/serve.yaml)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(Path(tmp) / "model", args.layers, args.heads, args.width, args.block)
        deadline = time.time() + args.timeout
        with served(model_dir, args.server_args, deadline) as url:
            rng = random.Random(0)
            n = args.clients * args.requests
            prompts = ["".join(rng.choice(ALPHABET[1:]) for _ in range(rng.randint(8, 64))) for _ in range(n)]

            async def both():
                await run_phase(url, prompts[: args.clients], args.clients, 8)  # warm-up, not counted
                batched = await run_phase(url, prompts, args.clients, args.max_tokens)
                single = await run_phase(url, prompts, 1, args.max_tokens)
                return batched, single

            batched, single = asyncio.run(asyncio.wait_for(both(), timeout=max(1.0, deadline - time.time())))
    figures = {
        "model": f"{args.layers}L/{args.heads}H/{args.width}, block {args.block}, {len(ALPHABET)} chars",
        "max_tokens": args.max_tokens,
        "server_args": args.server_args,
        "cpus": os.cpu_count(),
        "concurrent": batched,
        "one_at_a_time": single,
        "speedup": round(batched["tokens_per_s"] / single["tokens_per_s"], 2),
    }
    print(json.dumps(figures, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if batched["errors"] == single["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
