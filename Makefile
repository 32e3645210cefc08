# The two commands the README opens with. Each does its own set-up (scripts/setup.sh) first.
.PHONY: demo test setup bench lint

setup:
	@scripts/setup.sh

demo: setup
	scripts/demo.sh

test: setup
	.venv/bin/pytest -q

bench: setup
	.venv/bin/python benchmarks/bench_ingest.py

lint: setup
	.venv/bin/ruff check sparkvision tests benchmarks
