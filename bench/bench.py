"""Benchmarks: this project against its peers, measured side by side in one run.

    python bench/bench.py                    # every case for this device; table + bench/results/<host>-<date>.json
    python bench/bench.py --cases gen_b1     # some cases
    python bench/bench.py --quick            # fewer repeats (a smoke run, figures not for quoting)
    python bench/bench.py --cases train_baby trainer.precision=32-true compile=true   # ours with other settings
    python bench/bench.py --cases gen_b1 sample.dtype=float32 sample.compile=true       # (sample.yaml keys)
    python bench/bench.py --isa avx2         # every contender as an AVX2-only CPU runs it (bench/isa.py)

Each (case, implementation) runs in a fresh child process, so peak memory (max RSS on CPU, max allocated on
CUDA) belongs to that case alone and no warm cache leaks between contenders. The contenders of a case warm up
one after the other, then take turns: one timed repeat each, ours, peer, peer, ours, ... (the others wait
idle), so that the machine's drift hits all of them alike. Every figure is the median of 5 timed repeats.
MFU = model FLOPs per second / the device's peak, where the CPU peak is a matmul rate measured in the same run
(fp32 for fp32 work, bf16 for bf16 work) and the GPU peak is the card's dense bf16 datasheet figure.

Peers: Hugging Face `transformers.GPT2LMHeadModel` with identical dimensions (same weights for generation,
imported through gpt.convert), trained with the same AdamW settings in a plain PyTorch loop, in fp32 eager
(how most run it) and under bf16 autocast (the best a peer user could do); HF `generate`; HF GPT-2 + PEFT.
"Ours" runs the project's own path with the default settings for the device (configs/train.yaml,
configs/trainer/<cpu|gpu>.yaml, configs/sample.yaml).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
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

VOCAB = 65  # Tiny Shakespeare's characters, as in nanoGPT's char recipes

# name -> (description, dims); dims = n_layer, n_head, n_embd, block, batch
TRAIN_CASES = {
    "train_mini": ("pretraining step, nanoGPT CPU recipe 4L/4H/128, block 64, batch 12", (4, 4, 128, 64, 12)),
    "train_baby": ("pretraining step, 6L/6H/384, block 256, batch 8", (6, 6, 384, 256, 8)),
}
GEN_CASES = {
    "gen_b1": ("generation, 6L/384, batch 1, 256 new tokens", 1),
    "gen_b8": ("generation, 6L/384, batch 8, 256 new tokens", 8),
}
LORA_CASE = ("LoRA step, 6L/384, block 256, batch 8, r=16 on qkv/attn-out/mlp", (6, 6, 384, 256, 8))
PACK_CASE = (
    "fine-tuning step, 6L/384, block 256, batch 8 rows, examples of 16-200 tokens: tokens/s counts real "
    "tokens; unpacked (padded to the batch's longest, length-grouped) vs task.packing=true",
    (6, 6, 384, 256, 8),
)
GPU_CASE = ("GPT-2 124M pretraining, block 1024, bf16-mixed, compile, fused AdamW, flash SDPA", (12, 12, 768, 1024))
GEN_PROMPT, GEN_NEW = 16, 256


# ----------------------------------------------------------------------------------------------------
# helpers that run inside a child


def device_name() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


ISA = "native"  # --isa: the instruction set the children run with (bench/isa.py)
OVERRIDES: list[str] = []  # key=value overrides of configs/train.yaml (sample.key=value: sample.yaml) for "ours"


def default_config(name="train"):
    """The project's default config for this device (what `python train.py` / `sample.py` would use)."""
    from hydra import compose, initialize_config_dir

    import gpt.cli  # noqa: F401 (registers the config's resolvers)

    overrides = ["trainer=gpu"] if device_name() == "cuda" and name == "train" else []
    prefix = "sample." if name == "sample" else ""
    overrides += [
        o[len(prefix) :] for o in OVERRIDES if o.startswith(prefix) and (prefix or not o.startswith("sample."))
    ]
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose(name, overrides=overrides)


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def random_batches(n, batch, block, vocab=VOCAB, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, block + 1), generator=g) for _ in range(n)]


TAKE_TURNS = False  # set in a child of an interleaved run (--child ... --turns)


def wait_turn() -> None:
    """In an interleaved run, before each timed repeat: tell the parent this child is ready, and wait until
    the parent says go (it lets one contender of the case run at a time, in turn)."""
    if TAKE_TURNS:
        print("ready", flush=True)
        sys.stdin.readline()


def time_repeats(step, steps_per_repeat, repeats, warmup):
    """Run `step` warmup times, then `repeats` blocks of steps_per_repeat; seconds per block."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(repeats):
        wait_turn()
        t0 = time.perf_counter()
        for _ in range(steps_per_repeat):
            step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def hf_model(n_layer, n_head, n_embd, block, vocab=VOCAB, eos=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        n_positions=block,
        vocab_size=vocab,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    return GPT2LMHeadModel(cfg)


def hf_train_step(model, batches, precision, device):
    """A plain PyTorch loop over HF GPT-2: what a peer user writes."""
    import contextlib

    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    ctx = torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    it = iter(range(10**9))

    def step():
        b = batches[next(it) % len(batches)].to(device)
        with ctx:
            loss = model(input_ids=b[:, :-1], labels=b[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def ours_train_times(model, batches, steps_per_repeat, repeats, warmup, precision, compile_model):
    """Our pretraining path: LanguageModel + Lightning Trainer, timed per optimizer step by a callback."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, IterableDataset

    from gpt.callbacks import LeanAutocastForLoRA
    from gpt.lit import LanguageModel, quiet_lightning
    from gpt.tokenizer import Tokenizer

    quiet_lightning()

    class Stream(IterableDataset):
        def __iter__(self):
            i = 0
            while True:
                b = batches[i % len(batches)]
                yield b if isinstance(b, dict) else {"input_ids": b[:, :-1], "labels": b[:, 1:]}  # dict: ready
                i += 1

    class Timer(Callback):
        """Seconds per block of steps_per_repeat optimizer steps, after `warmup` steps."""

        def __init__(self):
            self.steps, self.start, self.times = 0, None, []

        def on_train_batch_end(self, trainer, *args):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.steps += 1
            done = self.steps - warmup
            if done > 0 and done % steps_per_repeat == 0:
                self.times.append(time.perf_counter() - self.start)
            if 0 <= done < steps_per_repeat * repeats and done % steps_per_repeat == 0:
                wait_turn()  # a repeat starts (in an interleaved run: when it is this contender's turn)
                self.start = time.perf_counter()

    timer = Timer()
    module = LanguageModel(
        model,
        Tokenizer.char_level("ab"),
        lr=1e-3,
        min_lr=1e-4,
        warmup_steps=10,
        betas=(0.9, 0.99),
        weight_decay=0.1,
        compile=compile_model,
    )
    total = warmup + steps_per_repeat * repeats
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        precision=precision,
        max_steps=total,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer, LeanAutocastForLoRA()],
    )  # as gpt.run.make_trainer
    trainer.fit(module, train_dataloaders=DataLoader(Stream(), batch_size=None))
    return timer.times


def child(case: str, impl: str, quick: bool) -> dict:
    import torch

    from gpt.config import GPTConfig
    from gpt.model import GPT

    torch.manual_seed(0)
    device = device_name()
    repeats = 5
    warmup = 3 if quick else 10
    out = {"case": case, "impl": impl, "device": device, "threads": torch.get_num_threads()}

    if case in TRAIN_CASES or case == "lora":
        n_layer, n_head, n_embd, block, batch = TRAIN_CASES[case][1] if case in TRAIN_CASES else LORA_CASE[1]
        steps = 5 if quick else (20 if n_embd <= 128 else 5)
        batches = random_batches(8, batch, block)
        tokens = batch * block * steps
        gcfg = GPTConfig(block_size=block, vocab_size=VOCAB, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        if impl.startswith("ours"):
            cfg = default_config()
            precision, compile_model = cfg.trainer.precision, bool(cfg.compile)
            model = GPT(gcfg)
            n_params = model.num_params()
            if case == "lora":
                from peft import LoraConfig, get_peft_model

                model = get_peft_model(
                    model,
                    LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"]),
                )
            times = ours_train_times(model, batches, steps, repeats, warmup, precision, compile_model)
            out.update(precision=precision, compile=compile_model)
        else:
            precision = "bf16" if impl.endswith("bf16") else "fp32"
            model = hf_model(n_layer, n_head, n_embd, block).to(device).train()
            n_params = GPT(gcfg).num_params()
            if case == "lora":
                from peft import LoraConfig, get_peft_model

                model = get_peft_model(
                    model,
                    LoraConfig(
                        r=16,
                        lora_alpha=32,
                        lora_dropout=0.0,
                        fan_in_fan_out=True,
                        target_modules=["c_attn", "c_proj", "c_fc"],
                    ),
                )
            times = time_repeats(hf_train_step(model, batches, precision, device), steps, repeats, warmup)
            out.update(precision=precision, compile=False)
        # 6N per token for a full training step; LoRA trains no base weight: forward 2N + input grads 2N.
        per_token = (4 if case == "lora" else 6) * n_params + 12 * n_layer * n_embd * block
        out.update(times=times, tokens_per_repeat=tokens, flops_per_token=per_token)

    elif case in GEN_CASES:
        batch = GEN_CASES[case][1]
        block = 512  # room for the prompt + 256 new tokens without sliding (peers would fail past n_positions)
        from gpt.tokenizer import Tokenizer

        tok = Tokenizer.char_level("".join(chr(33 + i) for i in range(VOCAB - 2)))  # 63 chars + EOS + UNK = 65
        hf = hf_model(6, 6, 384, block, eos=tok.eos_id).eval()
        prompt = torch.randint(0, VOCAB - 2, (batch, GEN_PROMPT), generator=torch.Generator().manual_seed(1))
        if impl.startswith("ours"):  # sample.py's defaults; ours_compiled: compile=true; ours_int8: + quantize=int8
            from gpt.convert import import_hf
            from gpt.generate import generate
            from gpt.inference import prepare_for_sampling

            with tempfile.TemporaryDirectory() as tmp:  # the same weights, through the converter
                hf.save_pretrained(Path(tmp) / "hf")
                tok.save(Path(tmp) / "hf")
                _, model = import_hf(Path(tmp) / "hf", Path(tmp) / "ours")
            scfg = default_config("sample")
            compile_step = bool(scfg.compile) or impl in ("ours_compiled", "ours_int8")
            quantize = "int8" if impl == "ours_int8" else scfg.get("quantize")
            model = prepare_for_sampling(model, torch.device(device), scfg.dtype, quantize)
            precision = str(model.transformer.wte.weight.dtype).removeprefix("torch.")
            precision = f"{quantize}+{precision}" if quantize else precision

            def step():
                with torch.inference_mode():
                    generate(model, prompt.to(device), GEN_NEW, temperature=0, compile=compile_step)
        else:
            precision = "fp32"
            hf = hf.to(device)

            def step():
                with torch.no_grad():
                    hf.generate(
                        prompt.to(device),
                        max_new_tokens=GEN_NEW,
                        min_new_tokens=GEN_NEW,
                        do_sample=False,
                        pad_token_id=0,
                        eos_token_id=None,
                    )

        t0 = time.perf_counter()
        step()  # the first call (compilation, when on), timed on its own
        first_s = time.perf_counter() - t0
        times = time_repeats(step, 1, repeats, 1 if quick else 2)
        n_params = GPT(GPTConfig(block_size=block, vocab_size=VOCAB, n_layer=6, n_head=6, n_embd=384)).num_params()
        out.update(
            times=times,
            tokens_per_repeat=batch * GEN_NEW,
            flops_per_token=2 * n_params,
            precision=precision,
            first_call_s=round(first_s, 2),
            compile=impl.startswith("ours") and compile_step,
        )

    elif case == "packing":  # the same kind of examples, as task batches: one padded example a row, or packed
        import numpy as np

        from gpt.batches import LengthGroupedBatches, pack_examples, pad_batch

        n_layer, n_head, n_embd, block, batch = PACK_CASE[1]
        rng = np.random.default_rng(0)
        examples = []
        for n in rng.integers(16, 201, size=400):
            ids = rng.integers(0, VOCAB, size=n).tolist()
            examples.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3 :], "length": int(n)})
        rows = pack_examples(examples, block) if impl == "ours_packed" else examples
        picked = [b for b, _ in zip(LengthGroupedBatches([r["length"] for r in rows], batch, seed=0), range(8))]
        batches = [pad_batch([rows[i] for i in b], 0) for b in picked]
        real = sum(b.pop("n_tokens") for b in batches)  # tokens of examples, not padding
        steps = len(batches)  # a repeat: each batch once (any 8 consecutive steps of the cycle)
        cfg = default_config()
        model = GPT(GPTConfig(block_size=block, vocab_size=VOCAB, n_layer=n_layer, n_head=n_head, n_embd=n_embd))
        times = ours_train_times(model, batches, steps, repeats, 3 if quick else steps, cfg.trainer.precision, False)
        out.update(
            times=times,
            tokens_per_repeat=real,
            precision=cfg.trainer.precision,
            compile=False,
            flops_per_token=6 * model.num_params() + 12 * n_layer * n_embd * block,
            padded_tokens=sum(b["input_ids"].numel() for b in batches),
        )
    elif case == "gpt2":
        n_layer, n_head, n_embd, block = GPU_CASE[1]
        batch = 16 if device == "cuda" else 1
        steps = 10 if device == "cuda" else 1
        batches = random_batches(4, batch, block, vocab=50304)
        model = GPT(GPTConfig(block_size=block, vocab_size=50304, n_layer=n_layer, n_head=n_head, n_embd=n_embd))
        n_params = model.num_params()
        times = ours_train_times(model, batches, steps, repeats, 3 if device == "cpu" else 10, "bf16-mixed", True)
        out.update(
            times=times,
            tokens_per_repeat=batch * block * steps,
            precision="bf16-mixed",
            compile=True,
            flops_per_token=6 * n_params + 12 * n_layer * n_embd * block,
        )
    elif case == "peak":
        out.update(peak_flops=measure_peak_flops(device))
    else:
        raise SystemExit(f"unknown case {case}")
    out["peak_mem_mb"] = peak_memory_mb()
    return out


def measure_peak_flops(device) -> dict:
    """Matmul rate of this device (n=2048), fp32 and bf16, median of 5: the MFU denominator on CPU."""
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name()
        dense_bf16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}
        peak = next((v for k, v in dense_bf16.items() if k in name), None)
        return {"fp32": peak, "bf16": peak, "source": f"datasheet dense bf16 for {name}"}
    from gpt.devices import cpu_has_native_bf16

    n = 2048
    rates = {}
    # Without native bf16 (AVX2-only CPUs, or GPT_CPU_BF16=0) a bf16 matmul is emulated, ~50x slower than fp32
    # there: 2048^3 of it would take minutes and no contender computes in bf16 on such a CPU anyway.
    kinds = (("fp32", torch.float32), ("bf16", torch.bfloat16)) if cpu_has_native_bf16() else (("fp32", torch.float32),)
    for name, dtype in kinds:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        times = time_repeats(lambda: a @ b, 3, 5, 2)
        rates[name] = 2 * n**3 * 3 / statistics.median(times)
    rates["source"] = f"measured {n}x{n} matmul, {torch.get_num_threads()} threads"
    return rates


# ----------------------------------------------------------------------------------------------------
# the parent: run every contender in its own process, then compare


def child_cmd(case, impl, quick, *extra) -> list[str]:
    return [sys.executable, __file__, "--child", case, impl, *extra] + (["--quick"] if quick else []) + OVERRIDES


def run_child(case, impl, quick) -> dict:
    proc = subprocess.run(child_cmd(case, impl, quick), capture_output=True, text=True, cwd=ROOT, env=isa_env(ISA))
    if proc.returncode != 0:
        return {"case": case, "impl": impl, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_in_turns(case, impls, quick) -> list[dict]:
    """Every contender of a case in its own process, started one after the other (each warms up, and
    compiles, alone); then their timed repeats run one at a time, in turn: ours, peer, peer, ours, peer, ...
    A shared VM's speed drifts by tens of % within minutes; taking turns gives every contender the same
    share of each phase, where contenders run back to back would each meet a different one."""
    children = {}
    for impl in impls:
        print(f"starting {case} / {impl} ...", file=sys.stderr, flush=True)
        err = tempfile.TemporaryFile("w+")
        proc = subprocess.Popen(
            child_cmd(case, impl, quick, "--turns"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=ROOT,
            env=isa_env(ISA),
        )
        children[impl] = (proc, err, [])
        read_until_ready(proc, children[impl][2])  # warm, waiting for its first turn
    live = [impl for impl in impls if children[impl][0].poll() is None]
    while live:
        for impl in list(live):
            proc, _, lines = children[impl]
            proc.stdin.write("go\n")
            proc.stdin.flush()
            if not read_until_ready(proc, lines):  # its last repeat: it wrote its result and exited
                live.remove(impl)
    results = []
    for impl, (proc, err, lines) in children.items():
        proc.wait()
        err.seek(0)
        if proc.returncode != 0 or not lines:
            results.append({"case": case, "impl": impl, "error": (err.read().strip().splitlines() or ["failed"])[-1]})
        else:
            results.append(json.loads(lines[-1]))
    return results


def read_until_ready(proc, lines: list) -> bool:
    """Read the child's output up to its next "ready" (True) or its end (False); other lines go to `lines`."""
    for line in proc.stdout:
        if line.strip() == "ready":
            return True
        lines.append(line)
    return False


def plan(cases, device):
    """Who runs each case. A CPU without native bf16 gets no bf16 peer (it would measure bf16 emulation,
    which no one would choose there): ours runs in that CPU's default precision, fp32."""
    import torch

    from gpt.devices import has_fast_bf16

    bf16 = has_fast_bf16(torch.device(device)) and ISA == "native"  # --isa avx2: no native bf16
    contenders = []
    for case in cases:
        if case in TRAIN_CASES:
            contenders += [(case, "ours"), (case, "hf_fp32")] + ([(case, "hf_bf16")] if bf16 else [])
        elif case in GEN_CASES:
            contenders += [(case, "ours"), (case, "ours_compiled"), (case, "ours_int8"), (case, "hf")]
        elif case == "lora":
            contenders += [(case, "ours"), (case, "hf_fp32")] + ([(case, "hf_bf16")] if bf16 else [])
        elif case == "gpt2":
            contenders += [(case, "ours")]
        elif case == "packing":
            contenders += [(case, "ours_unpacked"), (case, "ours_packed")]
    return contenders


def summarize(results, peak):
    rows = []
    by_case = {}
    for r in results:
        by_case.setdefault(r["case"], []).append(r)
    for case, rs in by_case.items():
        ours = {
            r["impl"]: r["tokens_per_repeat"] / statistics.median(r["times"])
            for r in rs
            if r["impl"].startswith("ours") and "times" in r
        }
        for r in rs:
            if "error" in r:
                rows.append({"case": case, "impl": r["impl"], "error": r["error"]})
                continue
            med = statistics.median(r["times"])
            tps = r["tokens_per_repeat"] / med
            kind = "bf16" if any(k in str(r.get("precision")) for k in ("bf16", "bfloat16")) else "fp32"
            denom = peak.get(kind) if peak else None
            mfu = tps * r["flops_per_token"] / denom if denom else None
            peer = not r["impl"].startswith("ours")
            rows.append(
                {
                    "case": case,
                    "impl": r["impl"],
                    "precision": r.get("precision"),
                    "compile": r.get("compile"),
                    "tokens_per_s": round(tps, 1),
                    "median_s": round(med, 5),
                    "min_max_s": [round(min(r["times"]), 5), round(max(r["times"]), 5)],
                    "peak_mem_mb": round(r["peak_mem_mb"], 1),
                    "mfu": round(mfu, 4) if mfu else None,
                    "first_call_s": r.get("first_call_s"),
                    # each of our contenders (default settings; compiled) against this peer
                    **{f"{o}_vs_this": round(o_tps / tps, 2) if peer else None for o, o_tps in ours.items()},
                }
            )
    return rows


def print_table(rows, descriptions):
    print(
        f"\n{'case':<11} {'impl':<14} {'prec':<10} {'tokens/s':>10} {'peak MB':>9} {'MFU':>7}  "
        "ours/this (ours [/ ours_compiled / ours_int8])"
    )
    last = None
    for r in rows:
        if r["case"] != last:
            print(f"-- {descriptions.get(r['case'], r['case'])}")
            last = r["case"]
        if "error" in r:
            print(f"{r['case']:<11} {r['impl']:<14} error: {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        ratio = " / ".join(f"{v:.2f}x" for k, v in r.items() if k.endswith("_vs_this") and v)
        print(
            f"{r['case']:<11} {r['impl']:<14} {str(r['precision']):<10} {r['tokens_per_s']:>10,.0f} "
            f"{r['peak_mem_mb']:>9,.0f} {mfu:>7}  {ratio}"
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--cases",
        default=None,
        help="comma-separated: " + ",".join([*TRAIN_CASES, *GEN_CASES, "lora", "packing", "gpt2"]),
    )
    ap.add_argument("--quick", action="store_true", help="fewer warm-up steps (smoke run)")
    ap.add_argument("--isa", choices=ISA_CHOICES, default="native", help="avx2: run as an AVX2-only CPU would")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/<host>-<date>.json)")
    ap.add_argument("--child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    ap.add_argument("--turns", action="store_true", help=argparse.SUPPRESS)  # a child that takes turns
    ap.add_argument(
        "overrides",
        nargs="*",
        help="key=value overrides of configs/train.yaml (sample.key=value: configs/sample.yaml) for ours",
    )
    args = ap.parse_args()
    OVERRIDES.extend(args.overrides)
    global ISA
    ISA = args.isa

    if args.child:
        global TAKE_TURNS
        TAKE_TURNS = args.turns
        print(json.dumps(child(*args.child, quick=args.quick)))
        return

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    default = [*TRAIN_CASES, *GEN_CASES, "lora", "packing", "gpt2"]  # gpt2: skipped off CUDA unless named
    cases = args.cases.split(",") if args.cases else default
    descriptions = {
        **{k: v[0] for k, v in TRAIN_CASES.items()},
        **{k: v[0] for k, v in GEN_CASES.items()},
        "lora": LORA_CASE[0],
        "packing": PACK_CASE[0],
        "gpt2": GPU_CASE[0],
    }
    t0 = time.time()
    peak = run_child("peak", "ours", args.quick).get("peak_flops", {})
    results = []
    for case in cases:
        contenders = plan([case], device)
        if case == "gpt2" and device != "cuda" and not args.cases:
            reason = (
                "skipped: a GPU case (GPT-2 124M at block 1024 with bf16-mixed, compile, fused AdamW, flash SDPA); "
                "--cases gpt2 runs the same script on this device at batch 1"
            )
            print(f"{case}: {reason}; this device is {device}", file=sys.stderr, flush=True)
            results += [{"case": case, "impl": impl, "error": reason} for _, impl in contenders]
            continue
        results += run_in_turns(case, [impl for _, impl in contenders], args.quick)
    rows = summarize(results, peak)
    print_table(rows, descriptions)
    if peak:
        print(
            f"\npeak: fp32 {peak.get('fp32', 0) / 1e9:,.0f} GFLOP/s, bf16 {peak.get('bf16', 0) / 1e9:,.0f} GFLOP/s "
            f"({peak.get('source')})"
        )
    report = {
        "host": socket.gethostname(),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "device": device,
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "quick": args.quick,
        "interleaved": True,
        "isa": ISA,
        "overrides": OVERRIDES,
        "peak_flops": peak,
        "cases": cases,
        "descriptions": descriptions,
        "results": rows,
        "raw": results,
        "seconds": round(time.time() - t0, 1),
    }
    suffix = "" if ISA == "native" else f"-{ISA}"
    out = (
        Path(args.out)
        if args.out
        else ROOT / "bench" / "results" / f"{socket.gethostname()}-{dt.date.today()}{suffix}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merge_earlier(out, report, cases), indent=2))
    print(f"wrote {out}")


def merge_earlier(out: Path, report: dict, cases: list[str]) -> dict:
    """A run of some cases (--cases) into an existing file of the same host, device and settings keeps that
    file's other cases, so a full table can be measured in parts (each part with its own peak and date)."""
    if not out.is_file():
        return report
    old = json.loads(out.read_text())
    same = all(old.get(k, "native") == report[k] for k in ("isa",)) and all(
        old.get(k) == report[k] for k in ("host", "device", "torch", "quick", "overrides")
    )
    if not same:
        return report
    keep = [r for r in old.get("parts", [old]) if not set(r["cases"]) <= set(cases)]
    part = {"cases": cases, "date": report["date"], "peak_flops": report["peak_flops"], "seconds": report["seconds"]}
    report["parts"] = [{k: r[k] for k in ("cases", "date", "peak_flops", "seconds")} for r in keep] + [part]
    report["results"] = [r for r in old["results"] if r["case"] not in cases] + report["results"]
    report["raw"] = [r for r in old["raw"] if r["case"] not in cases] + report["raw"]
    return report


def cpu_model() -> str:
    """The CPU's model name and its bf16 features (what decides the CPU defaults)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return f"{name} ({', '.join(f for f in ('avx512_bf16', 'amx_bf16') if f in flags) or 'no native bf16'})"


if __name__ == "__main__":
    main()
