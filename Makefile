# make demo   install, then prepare data -> pretrain nanoGPT's CPU recipe (+ loss.png) -> sample (+ attention.png)
#             -> the run's report card (report.md)
# make test   install, lint (ruff), then run the test suite (hermetic: no network, no data folder needed)
# make test-data  the tests that need the real corpora in $$GPT_DATA_DIR (CI: ../shared/data)
# make test-slow  the slow tests (multi-process: DDP, workers, sweeps; bounded-memory preparation; GGUF in llama.cpp)
# make test-browser  the chat page (gpt.serve's GET /) in a headless chromium (Debian's, installed with apt-get if
#             missing), driven by playwright
# make test-avx2  the suite as an AVX2-only CPU runs it (torch's AVX2 kernels, no native bf16)
# make test-newest  make test on the newest Python the project supports (3.13), in a venv of its own
# make shakespeare  install, then pretrain a base on in-domain text -> fully fine-tune it on modern
#             English -> Shakespeare -> score the full valid split (BLEU, chrF; base/finetuned/copy), ~25 min
# make shakespeare-lora  the same with a LoRA adapter in place of full fine-tuning
# make shakespeare-dpo  after make shakespeare: preference-tune (DPO, a LoRA adapter) its fine-tuned model on pairs
#             made from the train pairs (Shakespeare's line over the modern line copied), then score it the same way
# make bench  install, then benchmark against peers (writes bench/results/<host>-<date>*.json): the step
#             benchmarks (bench/bench.py), whole recipe runs beside nanoGPT (bench/recipe.py, NANOGPT_DIR=<checkout>),
#             the server's time to first token with and without its prefix cache (bench/prefix_cache.py),
#             and on an AVX-512 CPU the first two again as an AVX2-only CPU runs them (--isa avx2); then the server
#             under overload (bench/serve_load.py: 64 streaming clients, 429s, tokens/s, TTFT and latency)
#
# TORCH_SPEC picks the PyTorch build: the default is the CPU wheel; on a CUDA machine use e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY          = $(VENV)/bin/python
STAMP       = $(VENV)/.installed
AVX512     := $(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo yes)

export GPT_DATA_DIR ?= data

.PHONY: install lint test test-data test-slow test-browser test-avx2 test-newest demo shakespeare shakespeare-lora \
	shakespeare-dpo bench clean

install: $(STAMP)

# The stamp records TORCH_SPEC: another spec reinstalls torch into the existing venv.
ifneq ($(shell cat $(STAMP) 2>/dev/null),$(strip $(TORCH_SPEC)))
.PHONY: $(STAMP)
endif

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	echo '$(strip $(TORCH_SPEC))' > $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q tests

# pyenv's 3.13 where it is there (these machines), else python3.13 on the PATH. Its torch is PyPI's build (CUDA
# libraries included: no CPU wheel of 2.13.0 for 3.13 is on these machines), which runs on the CPU alike.
PYTHON_NEWEST ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3.13) python3.13)
test-newest:
	$(MAKE) test PYTHON=$(PYTHON_NEWEST) VENV=.venv313

test-data: $(STAMP)
	$(PY) -m pytest -q -m data tests

# llama.cpp itself, for the GGUF tests: llama-cpp-python compiles it from source (~8.5 min on 2 cores the first
# time; pip keeps the wheel in its cache). GGML_NATIVE=OFF: a portable AVX2 build, so a cached wheel never meets a
# CPU without the instructions of the one that built it.
LLAMA_CPP_SPEC ?= llama-cpp-python==0.3.36
test-slow: $(STAMP)
	$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PY) -m pip install --quiet $(LLAMA_CPP_SPEC)
	$(PY) -m pytest -q -m slow tests

# playwright (a dev dependency) drives the system's chromium: no browser download (tests/test_chat_page.py finds it on
# the PATH, or at $$GPT_CHROMIUM).
test-browser: $(STAMP)
	command -v chromium >/dev/null || test -n "$$GPT_CHROMIUM" || (apt-get update && apt-get install -y chromium)
	$(PY) -m pytest -q -m browser tests

# ATEN_CPU_CAPABILITY=avx2: torch's own kernels as on an AVX2-only CPU; GPT_CPU_BF16=0: our bf16 probe says no.
# The int8 test runs in a process of its own: under this emulation (AVX2 kernels on an AVX-512 CPU), torchao's
# quantization followed by torch.compile in the same process crashed (SIGSEGV); on its own each passes.
INT8_TEST = tests/test_decoding.py::test_int8_weights_stay_close_to_the_model_and_decode_like_full_recomputation
test-avx2: $(STAMP)
	ATEN_CPU_CAPABILITY=avx2 GPT_CPU_BF16=0 $(PY) -m pytest -q tests --deselect $(INT8_TEST)
	ATEN_CPU_CAPABILITY=avx2 GPT_CPU_BF16=0 $(PY) -m pytest -q $(INT8_TEST)

demo: $(STAMP)
	$(PY) train.py experiment=shakespeare_char_cpu
	$(PY) sample.py ckpt=runs/shakespeare_char_cpu/latest/checkpoints/best prompt="ROMEO:" max_new_tokens=300 \
		attention_map=runs/shakespeare_char_cpu/latest/attention.png
	$(PY) -m gpt.report runs/shakespeare_char_cpu/latest

shakespeare: $(STAMP)
	$(PY) train.py experiment=shakespeare_modern_base
	$(PY) finetune.py experiment=shakespeare_modern_full

shakespeare-lora: $(STAMP)
	$(PY) train.py experiment=shakespeare_modern_base
	$(PY) finetune.py experiment=shakespeare_modern_lora

shakespeare-dpo: $(STAMP)
	$(PY) finetune.py experiment=shakespeare_modern_dpo

bench: $(STAMP)
	$(PY) bench/bench.py
	$(PY) bench/recipe.py
	$(PY) bench/prefix_cache.py
ifeq ($(AVX512),yes)
	$(PY) bench/bench.py --isa avx2
	$(PY) bench/recipe.py --isa avx2
endif
	$(PY) bench/serve_load.py

clean:
	rm -rf $(VENV) .cache runs multirun .pytest_cache
