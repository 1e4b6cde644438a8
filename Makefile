# Two commands do all the set-up on a fresh Debian machine:
#   make train   -> .venv, package, Fashion-MNIST (apt), then `nin train` (the fast recipe)
#   make test    -> same set-up (plus the d2l package the book-pipeline tests drive), then the test suite
#   make notebook -> same set-up, then JupyterLab on notebooks/nin.ipynb (the d2l chapter with nin)
#   make docs     -> the documentation site in site/ (make docs-serve previews it)
PY := .venv/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data browser wrk train test docs docs-serve bench mutation notebook weights clean

$(PY):
	python3 -m venv .venv

.venv/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e ".[dev,onnx,stream,serve,notebook,docs]"
	touch $@

setup: .venv/.installed data

# Debian ships the four original Fashion-MNIST files; install them when missing and apt is here.
data:
	@if [ ! -f $(FMNIST) ] && [ -z "$$NIN_DATA" ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; \
	fi

# The browser test (tests/test_serve.py) drives Debian's headless Chromium through its matching
# chromedriver; the serving benchmark loads the server with wrk.  Installed when missing and apt is here.
browser:
	@if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null; then \
		(apt-get install -y -qq chromium chromium-driver || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)) >/dev/null; \
	fi

wrk:
	@if ! command -v wrk >/dev/null && command -v apt-get >/dev/null; then \
		(apt-get install -y -qq wrk || (apt-get update -qq && apt-get install -y -qq wrk)) >/dev/null; \
	fi

train: setup
	.venv/bin/nin train $(ARGS)

test: setup .venv/.d2l-deps browser docs
	$(PY) -m pytest $(PYTEST_ARGS)

# The documentation site (mkdocs.yml): built into site/ with --strict (a broken link, a page missing from
# the navigation or an API reference that does not resolve fails it); docs-serve previews it while editing.
docs: .venv/.installed
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

docs-serve: .venv/.installed
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

# The book's pipeline (benchmarks and their smoke tests) is driven through the public d2l package
# (no deps: it pins old versions) plus the few modules it imports.
.venv/.d2l-deps: | .venv/.installed
	$(PY) -m pip install -q --no-deps "d2l==1.0.3"
	$(PY) -m pip install -q pandas requests ipython matplotlib-inline
	touch $@

bench: setup .venv/.d2l-deps wrk
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/run_all.py $(ARGS)

# Mutation testing of the training core (mutmut 3.8.1), outside CI's pass/fail like `make bench`: runs
# the fast tests against each mutant, without and with the issue-21 guard tests, niced on one thread, and
# writes benchmarks/results/mutation-<date>.md.  All of the scope takes hours on 2 cores; restrict it with
# MUTATION_ARGS="--functions training.recipes.lr_at,training.engine.train_step" (see benchmarks/mutation.py).
mutation: setup
	$(PY) -m pip install -q -e ".[mutation]"
	OMP_NUM_THREADS=1 nice -n 19 $(PY) benchmarks/mutation.py $(MUTATION_ARGS)

# Trains the shipped weights with nin's own recipes and publishes them into src/nin/weights/ (about 3 hours
# on this 2-core CPU); the commands are recorded in each file and in weights/index.json.  The thread count
# each file was trained with (two for the fast file and nin_d2l, one for best): the same count gives the
# same weights bit for bit.
weights: setup
	OMP_NUM_THREADS=2 .venv/bin/nin train --recipe fast --out runs/weights-fast
	$(PY) tools/publish_weights.py runs/weights-fast nin_fmnist.fashion_mnist_fast --default --command "nin train --recipe fast"
	OMP_NUM_THREADS=1 .venv/bin/nin train --recipe best --out runs/weights-best
	$(PY) tools/publish_weights.py runs/weights-best nin_fmnist.fashion_mnist_best --command "nin train --recipe best"
	OMP_NUM_THREADS=2 .venv/bin/nin train --recipe d2l-stable --out runs/weights-d2l
	$(PY) tools/publish_weights.py runs/weights-d2l nin_d2l.fashion_mnist --default --command "nin train --recipe d2l-stable"

# Opens the chapter notebook in JupyterLab (installed on first use; the tests run it with nbclient).
notebook: setup
	@$(PY) -c "import jupyterlab" 2>/dev/null || $(PY) -m pip install -q "jupyterlab>=4.2"
	.venv/bin/jupyter lab notebooks/nin.ipynb

clean:
	rm -rf .venv runs .pytest_cache site
