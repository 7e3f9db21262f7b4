VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

CONSTRAINTS := constraints.txt

.PHONY: install test bench clean constraints

# Every dependency comes at the version pinned in constraints.txt (the numbers depend on them).
install:
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -c $(CONSTRAINTS) torch==2.14.1 torchvision==0.29.1
	$(PIP) install -c $(CONSTRAINTS) -e '.[test]'

# Rewrite constraints.txt from what is installed in $(VENV) now (after a deliberate upgrade).
constraints:
	sed -n '/^#/p' $(CONSTRAINTS) > $(CONSTRAINTS).new
	$(PIP) freeze --exclude-editable | grep -v '^transexplain' >> $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

# pytest exits 5 when it collects no test: that is a failure of the suite, say so plainly.
test:
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests were collected"; exit 1; fi; exit $$rc

bench:
	$(PY) scripts/bench_explainers.py

clean:
	rm -rf $(VENV) build *.egg-info
