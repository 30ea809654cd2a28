# Each target creates .venv on first use and reuses it after.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PROMPT ?= The built-in function

.PHONY: demo test test-unit test-notebooks lint lab default-model clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/llmkit generate --prompt "$(PROMPT)" --max-new-tokens 120 --temperature 0

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test-unit: $(STAMP)
	$(VENV)/bin/pytest tests

test-notebooks: $(STAMP)
	$(VENV)/bin/pytest --nbval-lax notebooks/

test: lint test-unit test-notebooks

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

default-model: $(STAMP)
	@echo "see data/pydoc-lm/README.md"

clean:
	rm -rf $(VENV) book/_build
