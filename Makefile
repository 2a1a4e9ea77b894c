# The two set-up commands of the README: each creates/refreshes the environment it needs.
#   make demo   run lmforge's demo on the embedded default (no download, no data)
#   make test   run the whole test suite (ruff + pytest)
VENV ?= .venv

.PHONY: demo test lint clean

demo: $(VENV)/.ready-runtime
	$(VENV)/bin/lmforge demo

test: $(VENV)/.ready-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q

lint: $(VENV)/.ready-test
	$(VENV)/bin/ruff check .

$(VENV)/.ready-runtime: pyproject.toml scripts/setup-env.sh
	sh scripts/setup-env.sh $(VENV)
	touch $@

$(VENV)/.ready-test: pyproject.toml scripts/setup-env.sh
	sh scripts/setup-env.sh $(VENV) test
	touch $@ $(VENV)/.ready-runtime

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
