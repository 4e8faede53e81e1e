"""Sample from a model: `python sample.py ckpt=<model dir or .ckpt> prompt="ROMEO:"`.

Interactive mode streams each sample to stdout as it is generated. Batch mode (`input_file=`) reads one
prompt per line and writes one completion per line to `output_file`; newlines inside a prompt or a
completion are written as the two characters `\\n` so that lines stay lines.
"""

from __future__ import annotations

import io
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

from gpt.checkpoint import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, CONFIG_FILE, RECORD_FILE, WEIGHTS_FILE
from gpt.completions import (
    StreamPrinter,
    check_decoding,
    check_stop_strings,
    encode_prompt,
    escape,
    generate_batch,
    source_token_bias,
    unescape,
)
from gpt.errors import GPTError, check_seed, is_int
from gpt.generate import check_sampling_args, generate, prompt_too_long
from gpt.inference import load_for_sampling
from gpt.mbr import check_mbr, mbr_decode
from gpt.model import GPT
from gpt.prompts import PromptTemplate, finetuned_record, source_span
from gpt.textfiles import read_text_file, split_lines, write_lines_atomically
from gpt.tokenizer import TOKENIZER_FILE, Tokenizer


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
    task = finetuned_record(cfg.get("ckpt")).get("task") if name == "auto" and not cfg.get("adapter") else None
    if name == "none" or (name == "auto" and not cfg.get("adapter") and task is None):
        return (lambda text: text), stops
    if name == "auto":
        from gpt.adapter import read_adapter_record

        task = task or read_adapter_record(cfg.adapter).get("task") or {}
        if "template" not in task:
            raise GPTError(
                f"adapter {cfg.adapter} does not record its task's prompt template; give one: "
                "template='...{input}...' (or template=none for prompts as they are)"
            )
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
    positive = {
        "num_samples": cfg.num_samples,
        "batch_size": cfg.batch_size,
        "attention_max_tokens": cfg.get("attention_max_tokens", 64),
    }
    for key, value in positive.items():
        if not is_int(value) or value < 1:
            raise GPTError(f"{key} must be a positive integer (got {value!r})")
    check_decoding(
        cfg.get("num_beams", 1),
        cfg.get("no_repeat_ngram_size", 0),
        cfg.get("copy_bonus", 0.0),
        cfg.get("length_penalty", 1.0),
        cfg.get("dtype", "auto"),
    )
    check_stop_strings(cfg.get("stop") or [], "stop")
    head = cfg.get("attention_head")
    if not (head is None or is_int(head)) or not is_int(cfg.get("attention_layer", -1)):
        raise GPTError(
            f"attention_layer and attention_head are layer / head numbers, attention_head=null for all "
            f"(got {cfg.get('attention_layer')!r}, {head!r})"
        )
    if not all(v is None or is_int(v) for v in (cfg.alignment_layer, cfg.alignment_head)):
        raise GPTError(
            f"alignment_layer and alignment_head are layer / head numbers, null for the mean of all (got "
            f"{cfg.alignment_layer!r}, {cfg.alignment_head!r})"
        )
    check_mbr(cfg.mbr, cfg.mbr_samples, cfg.mbr_include_source, cfg.mbr_utility, cfg.temperature)
    if cfg.mbr and cfg.num_samples != 1:
        raise GPTError(
            "mbr=true chooses one text among candidates: num_samples must be 1 (mbr_samples sets how many are drawn)"
        )
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", str(cfg.device)):
        raise GPTError(f"device must be auto, cpu, cuda or cuda:N (got {cfg.device!r})")
    if cfg.on_context_full not in ("slide", "stop"):
        raise GPTError(f"on_context_full must be slide or stop (got {cfg.on_context_full!r})")
    if cfg.get("unknown_chars", "error") not in ("error", "unk"):
        raise GPTError(f"unknown_chars must be error or unk (got {cfg.unknown_chars!r})")
    if cfg.input_file and not cfg.output_file:
        raise GPTError("batch mode needs output_file=<path> beside input_file")
    if cfg.output_file and not cfg.input_file:
        raise GPTError(
            "output_file is for batch mode: give input_file=<prompts, one per line> too (a single "
            "prompt's sample goes to stdout: redirect it with > file)"
        )
    if cfg.input_file and cfg.output_file and Path(cfg.output_file).resolve() == Path(cfg.input_file).resolve():
        raise GPTError(
            f"output_file={cfg.output_file} is the input_file: the completions would replace the prompts; "
            "choose another output_file"
        )
    if cfg.input_file and cfg.num_samples != 1:
        raise GPTError(
            "num_samples is for a single prompt; in batch mode each line of input_file gets one completion "
            "(repeat a line to get several)"
        )
    if cfg.input_file and cfg.prompt_file:
        raise GPTError("give input_file (batch mode: one prompt per line) or prompt_file (one prompt), not both")
    if (cfg.input_file or cfg.prompt_file) and cfg.prompt != DEFAULT_PROMPT:
        raise GPTError(
            f"prompt= and {'input_file' if cfg.input_file else 'prompt_file'}= both give the prompt; keep one of them"
        )
    for key in ("input_file", "prompt_file"):
        if cfg.get(key) and not Path(cfg[key]).is_file():
            what = (
                "is a directory, not a file"
                if Path(cfg[key]).is_dir()
                else "does not exist"
                if not os.path.lexists(cfg[key])
                else "is not a regular file (a pipe, device or socket: it is "
                "read twice, to check it and to use it); write its text to a file first"
            )
            raise GPTError(f"{key} {cfg[key]} {what}; point it at a UTF-8 text file")
    for key, suffix_ok in (("output_file", True), ("attention_map", False), ("alignment_map", False)):
        out = cfg.get(key)
        if not out:
            continue
        out = Path(out)
        if out.is_dir():
            raise GPTError(f"{key}={out} is a directory; give a file name" + ("" if suffix_ok else ", e.g. attn.png"))
        read = next((p for p in files_read(cfg) if os.path.samefile(out, p)), None) if out.exists() else None
        if read is not None:  # even with overwrite=true: the run would destroy what it reads
            what = "a file" if os.path.abspath(out) == os.path.abspath(read) else f"the same file as {read}, a file"
            raise GPTError(
                f"{key}={out} is {what} this run reads (the prompts or the model's own files); choose another path"
            )
        if out.exists() and not cfg.overwrite:
            raise GPTError(f"{out} exists; choose another {key} or pass overwrite=true")
        if not suffix_ok:
            from matplotlib.figure import Figure

            formats = Figure().canvas.get_supported_filetypes()
            if out.suffix.lstrip(".").lower() not in formats:
                raise GPTError(
                    f"{key}={out}: the name must end in an image type, e.g. .png ({', '.join(sorted(formats))})"
                )
        parent = out.parent if out.parent != Path("") else Path(".")
        existing = next(p for p in (parent.absolute(), *parent.absolute().parents) if p.exists())
        try:  # can a file be made there? (what the write will do; permission bits alone do not tell, e.g. as root)
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as e:
            raise GPTError(
                f"cannot write {key}={out}: no file can be made in {existing} ({e.strerror}); choose another path"
            ) from None
    for key in ("attention_map", "alignment_map"):
        if cfg.get(key) and (cfg.input_file or cfg.get("chat")):
            other = "input_file" if cfg.input_file else "chat=true"
            raise GPTError(f"{key} draws one sample: use it with prompt=..., not with {other}")


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


def sample(cfg) -> Optional[list[str]]:
    check_options(cfg)
    if cfg.get("chat"):  # the interactive multi-turn chat (gpt/chat.py)
        from gpt.chat import chat

        return chat(cfg)
    model, tokenizer, device = load_for_sampling(cfg)
    wrap, stops = prompt_template(cfg)
    if cfg.get("attention_map") or cfg.get("alignment_map"):  # (matplotlib: imported only for a picture)
        from gpt.viz import check_attention_choice

        if cfg.get("attention_map"):
            check_attention_choice(model.config, cfg.attention_layer, cfg.attention_head)
        if cfg.get("alignment_map"):
            check_attention_choice(model.config, cfg.alignment_layer, cfg.alignment_head, "alignment_")
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed)
    args = dict(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        stops=stops,
        stop_at_eos=cfg.stop_at_eos,
        generator=generator,
        on_context_full=cfg.on_context_full,
        no_repeat_ngram_size=cfg.get("no_repeat_ngram_size", 0),
        compile=cfg.get("compile", False),
    )
    strict = cfg.get("unknown_chars", "error") == "error"
    beams = dict(
        num_beams=cfg.get("num_beams", 1),
        length_penalty=cfg.get("length_penalty", 1.0),
        copy_bonus=cfg.get("copy_bonus", 0.0),
    )

    with torch.inference_mode():
        if cfg.input_file:  # batch mode: a file of prompts -> a file of completions
            lines = [unescape(line) for line in split_lines(read_text_file(cfg.input_file))]
            if not lines:
                raise GPTError(f"input_file {cfg.input_file} is empty: batch mode completes one prompt per line")
            completions = complete(cfg, model, tokenizer, [wrap(line) for line in lines], lines, strict, args, beams)
            write_lines_atomically(Path(cfg.output_file), [escape(c) for c in completions], cfg.overwrite)
            plural = "" if len(completions) == 1 else "s"
            print(f"wrote {len(completions)} completion{plural} to {cfg.output_file}", file=sys.stderr)
            return completions

        if cfg.prompt_file:
            raw = read_text_file(cfg.prompt_file)
        else:
            raw = unescape(cfg.prompt)
        prompt = wrap(raw)
        if beams["num_beams"] > 1 or cfg.mbr:  # one text chosen: nothing to stream or to sample several times
            text = complete(cfg, model, tokenizer, [prompt], [raw], strict, {**args, "batch_size": 1}, beams)[0]
            sys.stdout.write(prompt + text + "\n---------------\n")
            ids = encode_prompt(tokenizer, prompt, strict) + tokenizer.encode(text)
            draw_pictures(cfg, model, tokenizer, wrap, raw, prompt, text, ids)
            return [text]
        ids = encode_prompt(tokenizer, prompt, strict)
        if len(ids) > model.config.block_size:  # before any of it is printed
            raise prompt_too_long(len(ids), model.config.block_size)
        bias = (
            source_token_bias(tokenizer, [raw], model.config.vocab_size, beams["copy_bonus"], device)
            if beams["copy_bonus"]
            else None
        )
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        samples = []
        for i in range(cfg.num_samples):
            out = sys.stdout if cfg.stream else io.StringIO()  # not streamed: printed whole below
            printer = StreamPrinter(tokenizer, stops, out)
            out.write(prompt)
            generate(
                model,
                idx,
                cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                top_p=cfg.top_p,
                eos_token_id=tokenizer.eos_id if cfg.stop_at_eos else None,
                generator=generator,
                on_context_full=cfg.on_context_full,
                on_token=printer,
                no_repeat_ngram_size=cfg.get("no_repeat_ngram_size", 0),
                logit_bias=bias,
                compile=cfg.get("compile", False),
            )
            text = printer.finish()
            if not cfg.stream:
                sys.stdout.write(prompt + text)
            sys.stdout.write("\n---------------\n")
            sys.stdout.flush()
            samples.append(text)
            if i == 0:
                draw_pictures(cfg, model, tokenizer, wrap, raw, prompt, text, ids + printer.ids)
        return samples


def complete(cfg, model, tokenizer, prompts, sources, strict, args, beams) -> list[str]:
    """The completions of batch mode and of beam search: minimum Bayes-risk choices with mbr=true (gpt/mbr.py)."""
    args = {"batch_size": cfg.batch_size, **args}
    if not cfg.mbr:
        return generate_batch(model, tokenizer, prompts, sources=sources, strict=strict, **args, **beams)
    return mbr_decode(
        model,
        tokenizer,
        prompts,
        utility=cfg.mbr_utility,
        sources=sources,
        samples=cfg.mbr_samples,
        include_source=cfg.mbr_include_source,
        strict=strict,
        **args,
        **beams,
    )


def draw_pictures(cfg, model, tokenizer, wrap, raw: str, prompt: str, text: str, ids: list[int]) -> None:
    """attention_map and alignment_map of the first sample (ids: its prompt and completion tokens)."""
    if cfg.get("attention_map"):
        draw_attention(cfg, model, tokenizer, ids)
    if cfg.get("alignment_map"):
        from gpt.viz import alignment_map

        span = source_span(wrap, raw)
        drawn = alignment_map(
            model,
            tokenizer,
            [(prompt, text, span)],
            cfg.alignment_map,
            layer=cfg.alignment_layer,
            head=cfg.alignment_head,
        )[0]
        source = "the prompt" if span in (None, (0, len(prompt))) else "the input line in the template"
        print(
            f"alignment map ({drawn.shape[0]} output tokens x {drawn.shape[1]} source tokens, {source}): "
            f"{cfg.alignment_map}",
            file=sys.stderr,
        )


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
