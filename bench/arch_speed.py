"""Training speed of the CPU recipe's GPT-2 block against Llama's block, measured side by side.

    python bench/arch_speed.py                  # eager: 20 rounds
    python bench/arch_speed.py --compile        # each model through torch.compile first (the recipe's compile=true)

The shapes of experiment=shakespeare_char_cpu (4 layers, 4 heads, 128 dims, batch 12 x 64, 65-char vocab,
AdamW), one model per block. The models take turns, one timed round of 5 optimizer steps each, so that a
machine shared with other work slows them all alike; the figure per model is the mean of its faster half of
rounds (the least disturbed). Forward, backward and optimizer step only: no data loading, no validation.
"""

import argparse
import time

import torch

from gpt.config import GPTConfig
from gpt.model import GPT

RECIPE = dict(block_size=64, vocab_size=65, n_layer=4, n_head=4, n_embd=128, bias=False, activation="gelu")
LLAMA = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu")
BLOCKS = {
    "gpt2": {},
    "llama (4 kv heads)": LLAMA,
    "llama (2 kv heads)": dict(LLAMA, n_kv_head=2, mlp_hidden=384),  # = model=llama_mini
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {name: GPT(GPTConfig(**RECIPE, **extra)) for name, extra in BLOCKS.items()}
    optims = {name: torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True) for name, m in models.items()}
    steps = {name: (torch.compile(m) if args.compile else m) for name, m in models.items()}
    x = torch.randint(0, 65, (12, 64))
    y = torch.randint(0, 65, (12, 64))
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(args.rounds + 1):  # round 0 warms up (and compiles)
        for name, model in steps.items():
            t = time.perf_counter()
            for _ in range(5):
                model(x, y).loss.backward()
                optims[name].step()
                optims[name].zero_grad(set_to_none=True)
            if r:
                times[name].append((time.perf_counter() - t) / 5)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {'compiled' if args.compile else 'eager'}")
    for name, ts in times.items():
        fast = sorted(ts)[: max(1, len(ts) // 2)]
        step = sum(fast) / len(fast)
        print(
            f"{name:20s} {models[name].num_params():>9,} params  {1000 * step:6.1f} ms/step  "
            f"{x.numel() / step:>8,.0f} tokens/s"
        )


if __name__ == "__main__":
    main()
