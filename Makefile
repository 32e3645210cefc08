# The two commands the README opens with. Each does its own set-up (scripts/setup.sh) first.
.PHONY: demo test test-all setup bench lint

setup:
	@scripts/setup.sh

demo: setup
	scripts/demo.sh

test: setup
	.venv/bin/pytest -q

# Everything, the `slow` tests too (the real --ship-env round trip): what to run before a release.
test-all: setup
	.venv/bin/pytest -q -m "slow or not slow"

bench: setup
	.venv/bin/python benchmarks/bench_ingest.py

# Lint, formatting and types: what CI runs before the tests.
lint: setup
	.venv/bin/ruff check sparkvision tests benchmarks scripts
	.venv/bin/ruff format --check sparkvision tests benchmarks scripts
	.venv/bin/mypy
