# Each target creates .venv on first use and reuses it after.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PROMPT ?= The built-in function

.PHONY: demo test test-unit test-notebooks lint lab default-model runner book test-browser clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/llmkit generate --prompt "$(PROMPT)" --max-new-tokens 120 --temperature 0.7 --top-k 40 --seed 1

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test-unit: $(STAMP) runner
	$(VENV)/bin/pytest tests --ignore=tests/browser

# notebook 06 runs the C++ runner, so a fresh clone builds it first
test-notebooks: $(STAMP) runner
	$(VENV)/bin/pytest --nbval-lax notebooks/

# the browser checks run where Chromium is installed, and always in CI
test: lint test-unit test-notebooks $(if $(or $(CI),$(wildcard /usr/bin/chromium)),test-browser)

book: $(STAMP)
	$(VENV)/bin/jupyter-book build -W --keep-going -n book/
	$(PY) book/check_links.py book/_build/html

test-browser: $(STAMP) book
	$(VENV)/bin/pytest tests/browser

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

# Rebuild the shipped default model (data/pydoc-lm): corpus, tokenizer and training.
# DEVICE=cuda took 16 s on an H200; DEVICE=cpu works too, slowly.
DEVICE ?= cuda
default-model: $(STAMP)
	$(PY) -m llmkit.train --out data/pydoc-lm --device $(DEVICE)

# llmkit-run, the C++ runner for .pt2 packages: libtorch from the torch wheel, SentencePiece from
# Debian (apt-get install libsentencepiece-dev cmake g++).
runner: $(STAMP)
	cmake -S runner -B runner/build -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" > /dev/null
	cmake --build runner/build -j2

clean:
	rm -rf $(VENV) book/_build runner/build
