.PHONY: setup demo test bench

# Fresh machine -> .venv with everything, plus the embedded Fashion-MNIST data (Debian package).
setup:
	./scripts/setup.sh

# The main job: the whole pipeline on the embedded default data (CPU, local backends).
demo: setup
	.venv/bin/mqgen run

# The test suite (CPU; real Ray, Prefect, MLflow and LMDB on this machine).
test: setup
	.venv/bin/python -m pytest -q

bench: setup
	.venv/bin/python benchmarks/models.py
