"""Sample from a model: `python sample.py ckpt=<model dir or .ckpt> prompt="ROMEO:"`.

Interactive mode streams each sample to stdout as it is generated. Batch mode (`input_file=`) reads one
prompt per line and writes one completion per line to `output_file`; newlines inside a prompt or a
completion are written as the two characters `\\n` so that lines stay lines.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence, TextIO

import torch

from gpt.checkpoint import (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, CONFIG_FILE, RECORD_FILE, WEIGHTS_FILE,
                            atomic_file, load_model)
from gpt.errors import GPTError, check_seed, is_int, is_number, storage_errors
from gpt.model import GPT, check_sampling_args, prompt_too_long
from gpt.prompts import PromptTemplate
from gpt.textfiles import check_text_files, read_text, split_lines
from gpt.tokenizer import TOKENIZER_FILE, Tokenizer


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise GPTError(f"device={name} but no CUDA GPU is visible; use device=cpu")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise GPTError(f"device={name} but this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0; "
                       "use device=cuda")
    if name == "mps" and not torch.backends.mps.is_available():
        raise GPTError("device=mps but this PyTorch build or machine has no Apple GPU (MPS); use device=cpu")
    return torch.device(name)


def has_fast_bf16(device: torch.device) -> bool:
    """Whether this device multiplies bf16 matrices natively (CUDA with bf16; CPUs with AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "16": torch.float16}


def check_dtype(dtype, prefix: str = "") -> None:
    if dtype != "auto" and dtype not in DTYPES:
        raise GPTError(f"{prefix}dtype must be auto, float32, bfloat16 or float16 (got {dtype!r})")


def resolve_dtype(device: torch.device, dtype: str) -> torch.dtype:
    """"auto" is bfloat16 where the device computes it natively (half the weight bytes to read per generated
    token), else float32."""
    check_dtype(dtype)
    return (torch.bfloat16 if has_fast_bf16(device) else torch.float32) if dtype == "auto" else DTYPES[dtype]


def autocast(device: torch.device, dtype: str):
    """The autocast context for `dtype` (see resolve_dtype): the weights stay as they are."""
    dtype = resolve_dtype(device, dtype)
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def unescape(line: str) -> str:
    return line.replace("\\n", "\n").replace("\\t", "\t")


def escape(text: str) -> str:
    """One output line: a line break inside the text is written as \\n (\\r), which keeps line N of the
    output the completion of line N of the input for every line reader."""
    return text.replace("\n", "\\n").replace("\r", "\\r")


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """text up to the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class StreamPrinter:
    """Prints a single sample as its tokens arrive; says stop when a stop string appears.

    Decodes the whole continuation each time (byte-level BPE pieces may be half a character) and holds
    back what could still turn out to be the start of a stop string.
    """

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str], out: TextIO):
        self.tokenizer, self.stops, self.out = tokenizer, [s for s in stops if s], out
        self.ids: list[int] = []
        self.printed = 0
        self.holdback = max((len(s) for s in self.stops), default=1) - 1

    def __call__(self, token: torch.Tensor) -> bool:
        self.ids.append(int(token[0]))
        text = self.tokenizer.decode(self.ids)
        text, stopped = cut_at_stop(text, self.stops)
        # Not yet stopped: an incomplete UTF-8 sequence at the end (decoded as U+FFFD) waits for the rest, and
        # the complete text before it holds back what could begin a stop string.
        end = len(text) if stopped else len(text.rstrip("\ufffd")) - self.holdback
        if end > self.printed:
            self.out.write(text[self.printed:end])
            self.out.flush()
            self.printed = end
        return stopped

    def finish(self) -> str:
        text, _ = cut_at_stop(self.tokenizer.decode(self.ids), self.stops)
        self.out.write(text[self.printed:])
        self.out.flush()
        return text


def encode_prompt(tokenizer: Tokenizer, prompt: str, strict: bool = True) -> list[int]:
    ids = tokenizer.encode(prompt, strict=strict)
    if not ids:  # an empty prompt starts a fresh document
        if tokenizer.eos_id is None:
            raise GPTError("the prompt is empty and the tokenizer has no end-of-text token; give a prompt")
        ids = [tokenizer.eos_id]
    return ids


def left_pad(batch: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(B, T) ids with shorter prompts padded on the left, and the mask of real tokens (None if no padding)."""
    T = max(len(ids) for ids in batch)
    idx = torch.full((len(batch), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.bool)
    for i, ids in enumerate(batch):
        idx[i, T - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[i, T - len(ids):] = True
    return idx.to(device), (None if bool(mask.all()) else mask.to(device))


class StopStrings:
    """For `generate(on_token=...)` on a batch: marks the rows whose continuation contains a stop string,
    so generation ends once every row has stopped (the text after the stop is cut off later)."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str], batch_size: int):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.ids: list[list[int]] = [[] for _ in range(batch_size)]
        self.done = torch.zeros(batch_size, dtype=torch.bool)
        # a stop string of n characters lies within the last 4n + 1 tokens (a token is at least one byte)
        self.window = 4 * max((len(s) for s in self.stops), default=0) + 1

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        for row, token in enumerate(tokens.tolist()):
            if not self.done[row]:
                self.ids[row].append(token)
                tail = self.tokenizer.decode(self.ids[row][-self.window:])
                self.done[row] = any(s in tail for s in self.stops)
        return self.done.to(tokens.device)


def source_token_bias(tokenizer: Tokenizer, texts: Sequence[str], vocab_size: int, bonus: float,
                      device) -> torch.Tensor:
    """(B, V): `bonus` at the tokens of each text, 0 elsewhere. Each text is encoded as it is and after a
    space, because a byte-level BPE spells a word differently at the start of a text and after a space."""
    bias = torch.zeros(len(texts), vocab_size, device=device)
    for row, ids in enumerate(tokenizer.encode_batch([t for text in texts for t in (text, " " + text)])):
        bias[row // 2, ids] = bonus
    return bias


def check_decoding(num_beams=1, no_repeat_ngram_size=0, copy_bonus=0.0, length_penalty=1.0, dtype="auto",
                   prefix: str = "") -> None:
    """The decoding settings sample.py and fine-tuning's evaluation share (`prefix`: "eval." for the latter)."""
    check_dtype(dtype, prefix)
    if not is_number(length_penalty) or not math.isfinite(length_penalty):
        raise GPTError(f"{prefix}length_penalty must be a finite number (got {length_penalty!r}); 1.0 = scores "
                       "divided by the length, 0 = plain sums")
    if not is_int(num_beams) or num_beams < 1:
        raise GPTError(f"{prefix}num_beams must be a positive integer (got {num_beams!r}); 1 = greedy")
    if not is_int(no_repeat_ngram_size) or no_repeat_ngram_size < 0:
        raise GPTError(f"{prefix}no_repeat_ngram_size must be an integer >= 0 (got {no_repeat_ngram_size!r}); 0 = off")
    if not is_number(copy_bonus) or not 0 <= copy_bonus < math.inf:
        raise GPTError(f"{prefix}copy_bonus must be >= 0 (got {copy_bonus!r}); 0 = off")


def check_stop_strings(stops, key: str) -> None:
    if isinstance(stops, (str, bytes)) or not hasattr(stops, "__iter__"):
        raise GPTError(f"{key} must be a list of strings, e.g. {key}=['\\n\\n'] (got {stops!r})")
    if any(not str(s) for s in stops):
        raise GPTError(f"{key} holds an empty string, which would end every text at once; drop it ({key}=[] for none)")


def generate_batch(model: GPT, tokenizer: Tokenizer, prompts: list[str], *, max_new_tokens: int,
                   temperature: float, top_k=None, top_p=None, stops: Sequence[str] = (), stop_at_eos=True,
                   batch_size: int = 32, generator=None, on_context_full="slide", no_repeat_ngram_size: int = 0,
                   num_beams: int = 1, length_penalty: float = 1.0, copy_bonus: float = 0.0,
                   sources: Optional[Sequence[str]] = None, compile: bool = False, strict: bool = True) -> list[str]:
    """Completions for many prompts, batched (sorted by length so batches carry little padding).
    Sampling (temperature > 0) draws prompt i's tokens from its own random stream, seeded by the generator's
    seed and i: a completion does not depend on batch_size or on the other prompts.
    num_beams > 1: beam search (deterministic: needs temperature=0 and the EOS token).
    copy_bonus > 0: add it to the logits of the tokens of each prompt's source text (`sources`, e.g. the
    line a task template wraps; default the prompt itself), so words are carried over more readily: for
    tasks whose output mostly repeats the input (style transfer, correction).
    strict=False: characters a char-level tokenizer lacks become <|unk|> (as in training) instead of an error."""
    check_decoding(num_beams, no_repeat_ngram_size, copy_bonus, length_penalty)
    if sources is not None and len(sources) != len(prompts):
        raise ValueError("one source text per prompt")
    if num_beams > 1 and (temperature != 0 or not stop_at_eos or tokenizer.eos_id is None):
        raise GPTError(f"beam search (num_beams={num_beams}) finds the most likely text: it needs temperature=0 "
                       "and stop_at_eos=true; or use num_beams=1 to sample")
    device = next(model.parameters()).device
    encoded = []
    for i, prompt in enumerate(prompts):  # every prompt checked before any batch runs; a bad one named by its line
        line = f"prompt {i + 1} (line {i + 1} of a batch input)" if len(prompts) > 1 else "prompt"
        try:
            encoded.append(encode_prompt(tokenizer, prompt, strict))
        except GPTError as e:
            raise GPTError(f"{line}: {e}" if len(prompts) > 1 else str(e)) from None
        if len(encoded[-1]) > model.config.block_size:
            raise prompt_too_long(len(encoded[-1]), model.config.block_size, line)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[Optional[str]] = [None] * len(prompts)
    pad = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    # Beam search ends a beam at a token that holds a stop string (the text is cut there below).
    stop_ids = [i for i in range(tokenizer.vocab_size) if any(s in tokenizer.decode([i]) for s in stops)] \
        if num_beams > 1 and stops else []
    chunks = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    # The context fills by the padded length: a prompt padded beside longer ones would reach it (and slide,
    # stop, or end its beams) sooner than alone. Batches that can reach it are split into runs of prompts of
    # one length (the chunk is sorted by length): those need no padding.
    chunks = [part for chunk in chunks for part in (
        [list(same) for _, same in itertools.groupby(chunk, key=lambda i: len(encoded[i]))]
        if max(len(encoded[i]) for i in chunk) + max_new_tokens > model.config.block_size else [chunk])]
    for chunk in chunks:
        idx, mask = left_pad([encoded[i] for i in chunk], pad, device)
        bias = None
        if copy_bonus:
            texts = [(sources or prompts)[i] for i in chunk]
            bias = source_token_bias(tokenizer, texts, model.config.vocab_size, copy_bonus, device)
        if num_beams > 1:
            new = model.beam_search(idx, max_new_tokens, num_beams=num_beams, eos_token_id=tokenizer.eos_id,
                                    attention_mask=mask, length_penalty=length_penalty,
                                    no_repeat_ngram_size=no_repeat_ngram_size, logit_bias=bias,
                                    stop_token_ids=stop_ids)
        else:
            rows = None if generator is None or temperature == 0 else [
                torch.Generator(device=generator.device).manual_seed((generator.initial_seed() * 1_000_003 + i) % 2**63)
                for i in chunk]
            new = model.generate(idx, max_new_tokens, attention_mask=mask, temperature=temperature, top_k=top_k,
                                 top_p=top_p, eos_token_id=tokenizer.eos_id if stop_at_eos else None,
                                 generator=rows, on_context_full=on_context_full,
                                 on_token=StopStrings(tokenizer, stops, len(chunk)) if stops else None,
                                 no_repeat_ngram_size=no_repeat_ngram_size, logit_bias=bias, compile=compile)
        for row, i in enumerate(chunk):
            out[i] = cut_at_stop(tokenizer.decode(new[row].tolist()), stops)[0]
    return out


def write_lines_atomically(path: Path, lines: list[str], overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise GPTError(f"{path} exists; choose another output_file or pass overwrite=true")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f, storage_errors(path, "choose an output_file on another disk"):
        f.write("".join(line + "\n" for line in lines).encode("utf-8"))


def load_for_sampling(cfg) -> tuple[GPT, Tokenizer, torch.device]:
    device = resolve_device(cfg.device)
    if cfg.get("adapter"):  # a LoRA adapter on its base (the recorded one unless ckpt= says where it is)
        from gpt.adapter import load_adapter

        model, tokenizer, _ = load_adapter(cfg.adapter, cfg.get("ckpt"), map_location=device)
    else:
        if not cfg.get("ckpt"):
            raise GPTError("say which model to sample from: ckpt=<exported model dir or .ckpt> (or adapter=<adapter dir>)")
        model, tokenizer = load_model(cfg.ckpt, map_location=device)
    return prepare_for_sampling(model, device, cfg.dtype, cfg.get("quantize")), tokenizer, device


def prepare_for_sampling(model, device: torch.device, dtype: str = "auto", quantize: Optional[str] = None):
    """The model as sample.py runs it: in eval mode, on `device`, its weights stored in the sampling dtype (a
    token reads every weight once: not autocast, which would convert them again on every step; bf16 halves
    the bytes), optionally quantized (see quantize_weights)."""
    model = model.to(device, resolve_dtype(device, dtype)).eval()
    return quantize_weights(model, quantize) if quantize else model


def quantize_weights(model, how: str) -> GPT:
    """quantize=int8: every Linear's weight stored as int8 with one scale per output row (torchao's weight-only
    int8); activations stay in the sampling dtype. A batch-1 decode step reads every weight once per token, so
    it reads half the bytes of bf16: about 1.4x the tokens/s of bf16 with compile=true, where inductor calls its
    int8 x bf16 matmul kernel (README, Benchmark). Logits move by about 1% of their scale. An adapter is merged
    into the weights first; the token embedding (a lookup) keeps its dtype, so a tied LM head gets its own int8 copy.
    """
    if how != "int8":
        raise GPTError(f"quantize must be null or int8 (got {how!r})")
    from peft import PeftModel

    if isinstance(model, PeftModel):
        from gpt.adapter import merge

        model = merge(model)
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    try:
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, name: isinstance(module, torch.nn.Linear))
    except (RuntimeError, ValueError) as e:  # e.g. a model with n_embd=1: torchao's kernels need wider rows
        raise GPTError(f"quantize=int8 cannot quantize this model ({str(e).splitlines()[0][:120]}); sample it "
                       "without quantize") from e
    return model


def prompt_template(cfg) -> tuple[Callable[[str], str], list[str]]:
    """How each prompt is wrapped, and the stop strings that go with it.

    template=auto: with an adapter, its task's template (the way it was trained: a line of input_file
    becomes the task's input) and the task's stop strings; without one, prompts as they are.
    template=none: prompts as they are. Anything else: a template with an {input} field.
    """
    # \n and \t are unescaped as in prompts (a shell hands them over as two characters). A bare stop=AB is
    # already ["AB"] here (gpt.cli reads a bare value for a list setting as one item).
    stops = [unescape(str(s)) for s in cfg.stop or []]
    name = cfg.get("template", "auto")
    if not isinstance(name, str):
        raise GPTError(f"template must be auto, none, or a text with an {{input}} field (got {name!r})")
    if name == "none" or (name == "auto" and not cfg.get("adapter")):
        return (lambda text: text), stops
    if name == "auto":
        from gpt.adapter import read_adapter_record

        task = read_adapter_record(cfg.adapter).get("task") or {}
        if "template" not in task:
            raise GPTError(f"adapter {cfg.adapter} does not record its task's prompt template; give one: "
                           "template='...{input}...' (or template=none for prompts as they are)")
        template = PromptTemplate(task["template"], task.get("template_no_input"))
        field = "instruction" if task.get("format") == "alpaca" else "input"  # what one line of input is
        return (lambda text: template(**{field: text})), stops + [s for s in task.get("stop", []) if s not in stops]
    template = PromptTemplate(unescape(name))
    return (lambda text: template(input=text)), stops


DEFAULT_PROMPT = "\\n"  # configs/sample.yaml's prompt (a new line, as typed: unescaped when used)


def check_options(cfg) -> None:
    """sample.py's settings, all checked before the model is loaded; nothing given is silently ignored."""
    check_sampling_args(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
    check_seed(cfg.seed)
    positive = {"num_samples": cfg.num_samples, "batch_size": cfg.batch_size,
                "attention_max_tokens": cfg.get("attention_max_tokens", 64)}
    for key, value in positive.items():
        if not is_int(value) or value < 1:
            raise GPTError(f"{key} must be a positive integer (got {value!r})")
    check_decoding(cfg.get("num_beams", 1), cfg.get("no_repeat_ngram_size", 0), cfg.get("copy_bonus", 0.0),
                   cfg.get("length_penalty", 1.0), cfg.get("dtype", "auto"))
    check_stop_strings(cfg.get("stop") or [], "stop")
    head = cfg.get("attention_head")
    if not (head is None or is_int(head)) or not is_int(cfg.get("attention_layer", -1)):
        raise GPTError(f"attention_layer and attention_head are layer / head numbers, attention_head=null for all "
                       f"(got {cfg.get('attention_layer')!r}, {head!r})")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", str(cfg.device)):
        raise GPTError(f"device must be auto, cpu, cuda or cuda:N (got {cfg.device!r})")
    if cfg.on_context_full not in ("slide", "stop"):
        raise GPTError(f"on_context_full must be slide or stop (got {cfg.on_context_full!r})")
    if cfg.get("unknown_chars", "error") not in ("error", "unk"):
        raise GPTError(f"unknown_chars must be error or unk (got {cfg.unknown_chars!r})")
    if cfg.input_file and not cfg.output_file:
        raise GPTError("batch mode needs output_file=<path> beside input_file")
    if cfg.output_file and not cfg.input_file:
        raise GPTError("output_file is for batch mode: give input_file=<prompts, one per line> too (a single "
                       "prompt's sample goes to stdout: redirect it with > file)")
    if cfg.input_file and cfg.output_file and Path(cfg.output_file).resolve() == Path(cfg.input_file).resolve():
        raise GPTError(f"output_file={cfg.output_file} is the input_file: the completions would replace the prompts; "
                       "choose another output_file")
    if cfg.input_file and cfg.num_samples != 1:
        raise GPTError("num_samples is for a single prompt; in batch mode each line of input_file gets one completion "
                       "(repeat a line to get several)")
    if cfg.input_file and cfg.prompt_file:
        raise GPTError("give input_file (batch mode: one prompt per line) or prompt_file (one prompt), not both")
    if (cfg.input_file or cfg.prompt_file) and cfg.prompt != DEFAULT_PROMPT:
        raise GPTError(f"prompt= and {'input_file' if cfg.input_file else 'prompt_file'}= both give the prompt; "
                       "keep one of them")
    for key in ("input_file", "prompt_file"):
        if cfg.get(key) and not Path(cfg[key]).is_file():
            what = ("is a directory, not a file" if Path(cfg[key]).is_dir() else "does not exist"
                    if not os.path.lexists(cfg[key]) else "is not a regular file (a pipe, device or socket: it is "
                    "read twice, to check it and to use it); write its text to a file first")
            raise GPTError(f"{key} {cfg[key]} {what}; point it at a UTF-8 text file")
    for key, suffix_ok in (("output_file", True), ("attention_map", False)):
        out = cfg.get(key)
        if not out:
            continue
        out = Path(out)
        if out.is_dir():
            raise GPTError(f"{key}={out} is a directory; give a file name" + ("" if suffix_ok else ", e.g. attn.png"))
        read = next((p for p in files_read(cfg) if os.path.samefile(out, p)), None) if out.exists() else None
        if read is not None:  # even with overwrite=true: the run would destroy what it reads
            what = "a file" if os.path.abspath(out) == os.path.abspath(read) else f"the same file as {read}, a file"
            raise GPTError(f"{key}={out} is {what} this run reads (the prompts or the model's own files); "
                           "choose another path")
        if out.exists() and not cfg.overwrite:
            raise GPTError(f"{out} exists; choose another {key} or pass overwrite=true")
        if not suffix_ok:
            from matplotlib.figure import Figure

            formats = Figure().canvas.get_supported_filetypes()
            if out.suffix.lstrip(".").lower() not in formats:
                raise GPTError(f"attention_map={out}: the name must end in an image type, e.g. .png "
                               f"({', '.join(sorted(formats))})")
        parent = out.parent if out.parent != Path("") else Path(".")
        existing = next(p for p in (parent.absolute(), *parent.absolute().parents) if p.exists())
        try:  # can a file be made there? (what the write will do; permission bits alone do not tell, e.g. as root)
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as e:
            raise GPTError(f"cannot write {key}={out}: no file can be made in {existing} ({e.strerror}); choose another "
                           "path") from None
    if cfg.get("attention_map") and cfg.input_file:
        raise GPTError("attention_map draws one sample: use it with prompt=..., not with input_file")


# What loading a model or adapter directory reads (gpt.checkpoint, gpt.adapter).
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, RECORD_FILE)


def files_read(cfg) -> list[Path]:
    """The files a sampling run reads: its prompt files, and the model's, adapter's and base's own files (or
    the .ckpt). Other files in those directories (earlier outputs, say) are not among them."""
    paths = [Path(cfg[key]) for key in ("input_file", "prompt_file") if cfg.get(key)]
    sources = [Path(cfg[key]) for key in ("ckpt", "adapter") if cfg.get(key)]
    if cfg.get("adapter") and not cfg.get("ckpt"):  # its recorded base
        from gpt.adapter import read_adapter_record  # (PEFT: imported to load the adapter anyway)

        sources.append(Path(read_adapter_record(cfg.adapter)["base"]["path"]))
    for source in sources:
        paths += [source / name for name in MODEL_FILES] if source.is_dir() else [source]
    return [p for p in paths if p.exists()]


def read_text_file(path: str | Path) -> str:
    """A prompt file's text, read as a corpus is (a byte-order mark dropped); a binary or non-UTF-8 file is
    refused as a corpus file is."""
    check_text_files([Path(path)], allow_empty=True)
    return read_text(Path(path))


def sample(cfg) -> Optional[list[str]]:
    check_options(cfg)
    model, tokenizer, device = load_for_sampling(cfg)
    wrap, stops = prompt_template(cfg)
    if cfg.get("attention_map"):
        from gpt.viz import check_attention_choice

        check_attention_choice(model.config, cfg.attention_layer, cfg.attention_head)
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed)
    args = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                stops=stops, stop_at_eos=cfg.stop_at_eos, generator=generator, on_context_full=cfg.on_context_full,
                no_repeat_ngram_size=cfg.get("no_repeat_ngram_size", 0), compile=cfg.get("compile", False))
    strict = cfg.get("unknown_chars", "error") == "error"
    beams = dict(num_beams=cfg.get("num_beams", 1), length_penalty=cfg.get("length_penalty", 1.0),
                 copy_bonus=cfg.get("copy_bonus", 0.0))

    with torch.inference_mode():
        if cfg.input_file:  # batch mode: a file of prompts -> a file of completions
            lines = [unescape(line) for line in split_lines(read_text_file(cfg.input_file))]
            if not lines:
                raise GPTError(f"input_file {cfg.input_file} is empty: batch mode completes one prompt per line")
            completions = generate_batch(model, tokenizer, [wrap(line) for line in lines], batch_size=cfg.batch_size,
                                         sources=lines, strict=strict, **args, **beams)
            write_lines_atomically(Path(cfg.output_file), [escape(c) for c in completions], cfg.overwrite)
            plural = "" if len(completions) == 1 else "s"
            print(f"wrote {len(completions)} completion{plural} to {cfg.output_file}", file=sys.stderr)
            return completions

        if cfg.prompt_file:
            raw = read_text_file(cfg.prompt_file)
        else:
            raw = unescape(cfg.prompt)
        prompt = wrap(raw)
        if beams["num_beams"] > 1:  # one most likely text: nothing to stream or to sample several times
            text = generate_batch(model, tokenizer, [prompt], batch_size=1, sources=[raw], strict=strict, **args,
                                  **beams)[0]
            sys.stdout.write(prompt + text + "\n---------------\n")
            return [text]
        ids = encode_prompt(tokenizer, prompt, strict)
        if len(ids) > model.config.block_size:  # before any of it is printed
            raise prompt_too_long(len(ids), model.config.block_size)
        bias = source_token_bias(tokenizer, [raw], model.config.vocab_size, beams["copy_bonus"], device) \
            if beams["copy_bonus"] else None
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        samples = []
        for i in range(cfg.num_samples):
            out = sys.stdout if cfg.stream else open(os.devnull, "w")
            printer = StreamPrinter(tokenizer, stops, out)
            out.write(prompt)
            model.generate(idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                           eos_token_id=tokenizer.eos_id if cfg.stop_at_eos else None, generator=generator,
                           on_context_full=cfg.on_context_full, on_token=printer,
                           no_repeat_ngram_size=cfg.get("no_repeat_ngram_size", 0), logit_bias=bias,
                           compile=cfg.get("compile", False))
            text = printer.finish()
            if not cfg.stream:
                sys.stdout.write(prompt + text)
            sys.stdout.write("\n---------------\n")
            sys.stdout.flush()
            samples.append(text)
            if i == 0 and cfg.get("attention_map"):
                draw_attention(cfg, model, tokenizer, ids + printer.ids)
        return samples


def draw_attention(cfg, model: GPT, tokenizer: Tokenizer, ids: list[int]) -> None:
    """The attention heatmap of the first sample: its last attention_max_tokens tokens (prompt + completion),
    run through the model's explicit attention path as one sequence."""
    from gpt.viz import attention_heatmap

    keep = min(cfg.attention_max_tokens, model.config.block_size)
    shown = ids[-keep:]
    attention_heatmap(model, tokenizer, shown, cfg.attention_map, layer=cfg.attention_layer, head=cfg.attention_head)
    what = "all heads" if cfg.attention_head is None else f"head {cfg.attention_head}"
    cut = f"the last {len(shown)} of {len(ids)} tokens" if len(shown) < len(ids) else f"{len(shown)} tokens"
    print(f"attention map ({cut}, layer {cfg.attention_layer}, {what}): {cfg.attention_map}", file=sys.stderr)
