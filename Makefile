# crossport: two commands do all the set-up — `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PORT   ?= 5000
ARGS   ?=

STANDIN ?= $(HOME)/.cache/crossport/standin

.PHONY: install run test test-fast coverage lint ui serve clean browser bench scale matrix peers rollout

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip check
	touch $(STAMP)

run: install
	$(PY) -m pipelines.run --stage all $(ARGS)

# Two test processes: most of the suite's time is single-threaded (imports, graph conversion, subprocesses).
TEST_WORKERS ?= 2

test: install browser
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder $(ARGS)

# The edit-run loop: every test that needs no pipeline run, no server and no subprocess (about a minute).
test-fast: install
	$(PY) -m pytest -m "not slow" $(ARGS)

# Statement coverage of the whole suite, the processes it starts included ([tool.coverage] in pyproject.toml).
coverage: install browser
	rm -f .coverage .coverage.*
	$(VENV)/bin/coverage run -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder $(ARGS)
	$(VENV)/bin/coverage combine --quiet
	$(VENV)/bin/coverage report

# Debian's Chromium and its driver, for the upload-page test (root or sudo needed once).
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; fi

# EMNIST byclass at full size (697,932 / 116,323 images) through every stage, on a stand-in
# archive in NIST's layout (tools/standin.py) since NIST's own cannot be downloaded here.
scale: install
	test -f $(STANDIN)/gzip.zip || $(PY) -m tools.standin --out $(STANDIN)
	$(PY) -m pipelines.run --stage all --dataset emnist-byclass --data-dir $(STANDIN) --epochs 2 --no-tracking $(ARGS)

# The no-false-alarm matrix, one line per run: the digits MLP at 1, 3 and 10 epochs with seeds 0-4, the CNN at 3
# epochs with seeds 0-1, and the foreign models of tools/zoo.py brought with --onnx.
matrix: install
	$(PY) -m tools.gate_matrix --out runs/matrix $(ARGS)
	$(PY) -m tools.gate_matrix --out runs/matrix --models cnn --epochs 3 --seeds 0 1 --zoo $(ARGS)

# crossport side by side with litert-torch and onnx2tf on the newest version (each peer installed once, from
# peers/*.txt, into ~/.cache/crossport/peers: a few GB, downloaded from PyPI the first time).
peers: install
	$(PY) -m pipelines.bench --peers --out runs/peers $(ARGS)

bench: install
	$(PY) -m pipelines.bench $(ARGS)

# A rollout under load on the newest version, in runs/rollout (a scratch repository; yours is not touched): 4
# clients for 60 s while the run is published three more times and a tampered version appears.
rollout: install
	$(PY) -m pipelines.bench --rollout --out runs/rollout $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

ui: install
	$(PY) -m pipelines.ui --port $(PORT)

# Every model published under models/, each its newest version, as TF Serving serves it: REST on 8501, gRPC on 8500,
# new versions picked up as they are published.
serve: install
	$(PY) -m pipelines.serve models --port 8501 --grpc-port 8500 $(ARGS)

clean:
	rm -rf runs .pytest_cache
