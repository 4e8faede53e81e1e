"""lm-evaluation-harness in-process: any model we load, measured on the field's tasks as `hf` measures a
transformers model.

`GPTLM` is an lm-eval `LM` (registered as "gpt": `lm_eval --model gpt --model_args pretrained=<dir>` once this
module is imported) on one of our model directories, a .ckpt, an adapter on its base (merged, or kept
PEFT-wrapped with merge=False: the same numbers) or a Hugging Face GPT-2 / Llama directory (converted in memory).
It follows lm-eval's HFLM request by request, so a model and its `gpt.convert export-hf` directory score alike:

- loglikelihood: context and continuation encoded whole and split (lm-eval's `_encode_pair`: trailing spaces of
  the context go to the continuation); an empty context is the end-of-text token; a pair longer than the
  context is cut from the left, `(context + continuation)[-(block + 1):]`, exactly as HFLM does. The numbers
  come from gpt/scoring.py.
- loglikelihood_rolling: lm-eval's `get_rolling_token_windows` + `make_disjoint_window` (max_seq_len = the
  model's block, context_len = 1, the end-of-text token first), each window scored as above, summed.
- generate_until: contexts kept to their last (block - max_gen_toks) tokens, greedy (or sampled when the task
  asks) through gpt/generate.py's `generate` over the KV cache, stopping at the `until` strings and the
  end-of-text token; the text is cut at the first stop string. Where max_gen_toks leaves no room in the context
  (HFLM refuses that), the context keeps block - block // 2 tokens and generation slides the context.

`run_tasks` is the `python -m gpt.evaluate harness` verb: tasks resolved from local YAMLs (--include-path)
and lm-eval's own, `simple_evaluate`, lm-eval's table, and the results as JSON.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from gpt.completions import StopStrings, left_pad
from gpt.devices import resolve_device
from gpt.errors import GPTError
from gpt.generate import generate
from gpt.inference import prepare_for_sampling
from gpt.scoring import score_sequences
from gpt.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SAMPLING_KEYS = {"do_sample", "temperature", "top_k", "top_p"}  # generation_kwargs we act on (+ until, max_gen_toks)


def load_for_eval(path: str | Path, device: torch.device, base: Optional[str] = None, merge: bool = True):
    """(model, tokenizer) from a model dir / .ckpt of ours, an adapter dir (on its recorded base, or `base`),
    or a Hugging Face GPT-2 / Llama directory. merge: fold an adapter into its base (faster; same numbers)."""
    from gpt.checkpoint import RECORD_FILE
    from gpt.inference import load_any_model

    path = Path(path)
    if (path / RECORD_FILE).is_file():
        from gpt.adapter import load_adapter
        from gpt.adapter import merge as merge_adapter

        model, tokenizer, _ = load_adapter(path, base, map_location=device, base_option="--base")
        return (merge_adapter(model) if merge else model), tokenizer
    if base:
        raise GPTError(f"--base is for adapters, and {path} is not an adapter directory (no {RECORD_FILE}); drop it")
    return load_any_model(path, device)


@register_model("gpt")
class GPTLM(TemplateLM):
    """Our model as lm-eval's `LM`. Give `pretrained` (a path, see load_for_eval) or `model` + `tokenizer`."""

    def __init__(
        self,
        pretrained: Optional[str] = None,
        *,
        model=None,
        tokenizer: Optional[Tokenizer] = None,
        base: Optional[str] = None,
        merge: bool | str = True,
        batch_size: int | str = 16,
        device: str = "auto",
        dtype: str = "float32",
        max_gen_toks: int | str = 256,
        seed: int | str = 1234,
        **unused,
    ):
        super().__init__()
        if unused.pop("max_batch_size", None) is not None or unused:  # lm-eval's own, for batch_size=auto
            log.warning("gpt: ignoring %s", sorted(unused) or "max_batch_size")
        if str(batch_size).startswith("auto"):
            batch_size = 16  # no search for the largest batch: our batches are sorted by length anyway
        self.batch_size = int(batch_size)
        if self.batch_size <= 0:
            raise GPTError(f"batch_size must be a positive number of sequences (got {batch_size})")
        self._device = resolve_device(device)
        if model is None:
            if not pretrained:
                raise GPTError("say which model to evaluate: pretrained=<model dir, .ckpt or adapter dir>")
            model, tokenizer = load_for_eval(pretrained, self._device, base, str(merge).lower() not in ("false", "0"))
        elif tokenizer is None:
            raise GPTError("GPTLM(model=...) needs the model's tokenizer too (tokenizer=...)")
        if tokenizer.eos_id is None:
            raise GPTError("the model's tokenizer has no <|endoftext|> token, which lm-eval needs as the empty context")
        self.model = prepare_for_sampling(model, self._device, dtype)
        self.tokenizer = tokenizer
        self.name = str(pretrained or type(model).__name__)
        self._max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)

    # -- what lm-eval asks of a model ------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:  # the empty context (HFLM: BOS, which is <|endoftext|> in GPT-2's tokenizer)
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)  # no special tokens are added: as GPT-2's tokenizer in HFLM

    def get_model_info(self) -> dict:
        return {"model": self.name, "model_num_parameters": sum(p.numel() for p in self.model.parameters())}

    # -- scoring -----------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding gives the continuation) per (key, ctx, cont)."""
        block = self.max_length
        for _, _, cont in requests:
            if not cont or len(cont) > block:
                raise GPTError(
                    f"a continuation of {len(cont)} tokens cannot be scored by a model whose context is {block} tokens"
                    "; evaluate a task whose answers are shorter, or a model with a longer context"
                )
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        results = []
        chunk_size = self.batch_size * 8  # progress shown per few batches; sorted, so batches pad little
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests")
        for chunk in collator.get_batched(n=chunk_size):
            seqs = [(ctx + cont)[-(block + 1) :] for _, ctx, cont in chunk]  # HFLM's left truncation
            for (key, _, cont), scored in zip(chunk, score_sequences(self.model, seqs, batch_size=self.batch_size)):
                n = len(cont)
                greedy = bool(torch.equal(scored.greedy[-n:], torch.tensor(cont, dtype=scored.greedy.dtype)))
                answer = (float(scored.logprobs[-n:].double().sum()), greedy)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
                results.append(answer)
            bar.update(len(chunk))
        bar.close()
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text, in disjoint windows of the model's context (HFLM's windows)."""
        windows, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation --------------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each context's continuation up to its first `until` string (or the end-of-text token, or max_gen_toks
        tokens), batched by length among requests with the same generation settings."""
        encoded = {}

        def tokens(context: str) -> list[int]:
            if context not in encoded:
                encoded[context] = self.tok_encode(context) or [self.eot_token_id]  # "" starts a fresh document
            return encoded[context]

        collator = Collator(
            [req.args for req in requests],
            sort_fn=lambda a: (-len(tokens(a[0])), a[0]),
            group_by="gen_kwargs",
            group_fn=lambda a: a[1],
        )
        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        generator = torch.Generator(self._device).manual_seed(self.seed)
        block, results = self.max_length, []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests")
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, settings = zip(*chunk)
            kwargs = normalize_gen_kwargs(settings[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = kwargs.pop("max_gen_toks")
            unknown = sorted(set(kwargs) - SAMPLING_KEYS)
            if unknown:
                raise GPTError(
                    f"generation_kwargs {unknown} are not supported by the gpt model (it takes until, max_gen_toks, "
                    "do_sample, temperature, top_k, top_p); remove them from the task's YAML"
                )
            sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 0.0)) > 0
            if max_gen <= 0:
                raise GPTError(f"max_gen_toks must be a positive number of tokens (got {max_gen})")
            keep = block - max_gen if max_gen < block else block - block // 2
            idx, mask = left_pad([tokens(c)[-keep:] for c in contexts], self.eot_token_id, self._device)
            new = generate(
                self.model,
                idx,
                max_gen,
                attention_mask=mask,
                temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
                top_k=kwargs.get("top_k") if sample else None,
                top_p=kwargs.get("top_p") if sample else None,
                eos_token_id=self.eot_token_id,
                generator=generator if sample else None,
                on_token=StopStrings(self.tokenizer, until, len(contexts)),
            )
            for row, (context, setting) in enumerate(chunk):
                text = postprocess_generated_text(self.tokenizer.decode(new[row].tolist()), until, None)
                self.cache_hook.add_partial("generate_until", (context, setting), text)
                results.append(text)
            bar.update(len(chunk))
        bar.close()
        return collator.get_original(results)


# ----------------------------------------------------------------------------------------------------
# The command line's verb


@functools.lru_cache(maxsize=4)
def task_manager(include_path: tuple[str, ...], defaults: bool):
    """lm-eval's TaskManager, its index of task YAMLs read once per process (lm-eval's own: a few seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) or None, include_defaults=defaults)


def load_tasks(names: Sequence[str], include_path: Sequence[str] = ()) -> tuple[list, object]:
    """lm-eval Task / Group objects for `names` (task, group or tag names, or task YAML paths), and the
    TaskManager. Local tasks (include_path) are looked up first: lm-eval's own index (thousands of YAMLs, a few
    seconds) is only read when a name is not among them. Unknown names and tasks whose data cannot be loaded
    (e.g. on the hub, offline) are one GPTError each."""
    for p in include_path:
        if not Path(p).is_dir():
            raise GPTError(f"--include-path {p} is not a directory; point at a folder of lm-eval task YAMLs")
    include_path = tuple(str(Path(p).resolve()) for p in include_path)
    manager = task_manager(include_path, defaults=False) if include_path else None
    if manager is None or not all(n in manager.all_tasks or Path(n).is_file() for n in names):
        manager = task_manager(include_path, defaults=True)
    unknown = [n for n in names if n not in manager.all_tasks and not Path(n).is_file()]
    if unknown:
        near = [t for t in manager.all_tasks if unknown[0].lower() in t.lower()][:5]
        raise GPTError(
            f"unknown lm-eval task {unknown[0]!r}"
            + (f" (did you mean one of {near}?)" if near else "")
            + "; name a task lm-eval has, a task YAML, or a folder of YAMLs with --include-path"
        )
    built = []
    for name in names:
        try:
            loaded = manager.load([name])
        except Exception as e:  # noqa: BLE001 (datasets, the hub, the YAML: each fails in its own way)
            first = (str(e).splitlines() or [""])[0][:200]
            raise GPTError(
                f"task {name!r} could not be loaded ({type(e).__name__}: {first}); a task whose data lives on the "
                "Hugging Face hub needs the network (or HF_DATASETS_OFFLINE=1 with the data already cached): "
                "define it on local files instead (--include-path DIR holding a YAML with dataset_path: json and "
                "dataset_kwargs: {data_files: {test: /abs/path.jsonl}})"
            ) from e
        groups = loaded.get("groups") or {}
        built.extend([groups[name]] if name in groups else loaded["tasks"].values())
    return built, manager


def run_tasks(
    lm: GPTLM,
    names: Sequence[str],
    *,
    include_path: Sequence[str] = (),
    limit: Optional[float] = None,
    num_fewshot: Optional[int] = None,
) -> dict:
    """lm-eval's `simple_evaluate` on `lm`: its results dict (results, configs, versions, n-shot, ...)."""
    from lm_eval import simple_evaluate

    tasks, manager = load_tasks(names, include_path)
    return simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot, log_samples=False
    )


def default_output(model_path: str | Path) -> Path:
    """<model dir>/lm_eval/results_<time>.json (a .ckpt: beside it)."""
    model_path = Path(model_path)
    folder = model_path if model_path.is_dir() else model_path.parent
    return folder / "lm_eval" / f"results_{time.strftime('%Y-%m-%dT%H-%M-%S')}.json"


def write_results(results: dict, path: str | Path) -> Path:
    from lm_eval.utils import handle_non_serializable

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    except OSError as e:
        raise GPTError(f"cannot write the results to {path} ({e.strerror}); choose another place with --output") from e
    return path


def parse_limit(text: Optional[str]) -> Optional[float]:
    """lm-eval's limit: a whole number of documents per task, or a fraction (0 < f < 1) of them."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not (value >= 1 and value == int(value) or 0 < value < 1):
        raise GPTError(
            f"--limit must be a positive whole number of documents per task, or a fraction between 0 and 1 "
            f"(got {text!r}); leave it out to evaluate every document"
        )
    return int(value) if value >= 1 else value
