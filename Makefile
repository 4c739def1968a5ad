# The two commands README.md promises. Both install into ./.venv first (idempotent).
.PHONY: install up test test-fast bench

install:
	@bash scripts/install.sh

up: install
	HF_HUB_OFFLINE=1 .venv/bin/duet up

test: install
	@bash scripts/install-test-tools.sh
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -ra --durations=20 tests; rc=$$?; [ $$rc -eq 5 ] && exit 0; exit $$rc

# the fast tier alone, while changing code: no test that starts the real engine or `duet up` (CI runs both tiers)
test-fast: install
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -ra -m "not slow" --durations=10 tests

bench: install
	HF_HUB_OFFLINE=1 .venv/bin/python bench/serving.py
