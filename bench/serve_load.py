"""Load test of the OpenAI-compatible server (gpt/serve.py) under overload: `make bench` runs it.

    python bench/serve_load.py             # 64 streaming clients x 4 requests, max_waiting=32; JSON: bench/results/
    python bench/serve_load.py --compare   # then the same requests one at a time (the batching speedup)
    python bench/serve_load.py --clients 8 --requests 2 --max-tokens 16 --layers 2   # a quick smoke run
    python bench/serve_load.py threads=1   # key=value: more gpt.serve settings (configs/serve.yaml)

Makes a randomly initialised model of the given size (a `model=baby`-like shape with a 65-character vocabulary:
speed does not depend on the weights), starts `python -m gpt.serve` on a free loopback port in a child process
(max_batch_size 16 by default, and --max-waiting), and sends streaming /v1/completions requests (sampled,
stop_at_eos=false so every request generates exactly --max-tokens tokens). --clients concurrent clients each send
--requests requests back to back; more choices than max_batch_size + max_waiting at once get 429, and a refused
client waits the Retry-After seconds and sends the request again (as the openai client does). --compare then
sends the same requests one at a time. Reports the 5xx answers (and error events in a stream: there must be none),
the 429s, aggregate generated tokens/s, time to first token and per-request latency (p50/p99; both counted from
the request's first try, so the wait after a 429 is in them), and `cached_tokens`: the prompt tokens the server's
prefix cache served (the warm-up's prompts come again in the loaded phase, and --compare repeats them all, so with
the cache on those are partly read from it; prefix_cache_tokens=0 turns it off). The server is stopped (SIGTERM)
at the end, and the whole run is bounded by --timeout seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
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
    start, refused = time.perf_counter(), 0
    while True:
        first, tokens, cached, done = None, 0, 0, False
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code == 429:  # the queue is full: wait as told, then try again
                refused += 1
                await r.aread()
                await asyncio.sleep(float(r.headers["retry-after"]))
                continue
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}", "status": r.status_code}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                data = json.loads(line[6:])
                if "error" in data:
                    return {"error": data["error"]["message"], "status": 500, "refused": refused}
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
                    cached = data["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
                elif first is None and data["choices"] and data["choices"][0]["text"]:
                    first = time.perf_counter() - start
        if not done:
            return {"error": "the stream ended without [DONE]", "status": 500, "refused": refused}
        return {
            "ttft": first,
            "latency": time.perf_counter() - start,
            "tokens": tokens,
            "cached": cached,
            "refused": refused,
        }


async def run_phase(url: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    import httpx

    results: list[dict] = []
    queues = [list(enumerate(prompts))[i::clients] for i in range(clients)]

    async def client(work):
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
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
        "answered": len(ok),
        "http_5xx": sum(r.get("status", 0) >= 500 for r in results),  # (an error event in a stream counts)
        "http_429": sum(r.get("refused", 0) for r in results),
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
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-waiting", type=int, default=32, help="the server's max_waiting (its max_batch_size: 16)")
    p.add_argument("--compare", action="store_true", help="then send the same requests one at a time")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--timeout", type=float, default=900, help="seconds for the whole run")
    p.add_argument("--out", help="the JSON file (default bench/results/<host>-<date>-serve.json)")
    p.add_argument("server_args", nargs="*", help="more key=value settings for gpt.serve (configs/serve.yaml)")
    args = p.parse_args()
    server_args = [f"max_waiting={args.max_waiting}", *args.server_args]

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(Path(tmp) / "model", args.layers, args.heads, args.width, args.block)
        deadline = time.time() + args.timeout
        with served(model_dir, server_args, deadline) as url:
            rng = random.Random(0)
            n = args.clients * args.requests
            prompts = ["".join(rng.choice(ALPHABET[1:]) for _ in range(rng.randint(8, 64))) for _ in range(n)]

            async def phases():
                await run_phase(url, prompts[: args.clients], args.clients, 8)  # warm-up, not counted
                loaded = await run_phase(url, prompts, args.clients, args.max_tokens)
                single = await run_phase(url, prompts, 1, args.max_tokens) if args.compare else None
                return loaded, single

            loaded, single = asyncio.run(asyncio.wait_for(phases(), timeout=max(1.0, deadline - time.time())))
    from bench.bench import cpu_model

    figures = {
        "host": socket.gethostname(),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python bench/serve_load.py", *sys.argv[1:]]),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "model": f"{args.layers}L/{args.heads}H/{args.width}, block {args.block}, {len(ALPHABET)} chars",
        "max_tokens": args.max_tokens,
        "server_args": server_args,
        "concurrent": loaded,
    }
    if single is not None:
        figures.update(one_at_a_time=single, speedup=round(loaded["tokens_per_s"] / single["tokens_per_s"], 2))
    print(json.dumps(figures, indent=2))
    c = loaded
    print(
        f"\n{c['clients']} streaming clients x {args.requests}: {c['answered']}/{c['requests']} answered, "
        f"{c['http_5xx']} 5xx, {c['http_429']} 429s (retried), {c['tokens_per_s']} tokens/s, "
        f"TTFT p50/p99 {c['ttft_p50_ms']}/{c['ttft_p99_ms']} ms, "
        f"latency p50/p99 {c['latency_p50_s']}/{c['latency_p99_s']} s"
    )
    out = (
        Path(args.out)
        if args.out
        else ROOT / "bench" / "results" / f"{socket.gethostname()}-{dt.date.today()}-serve.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if c["errors"] == 0 and (single is None or single["errors"] == 0) else 1


if __name__ == "__main__":
    sys.exit(main())
