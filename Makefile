# The two README commands: `make demo` (main job) and `make test`.
# Both create .venv idempotently: it is rebuilt only when a requirements file changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	touch $@

# Main job: the demo suite on synthetic data (local Ray, MLflow in sqlite), then its report.
demo: venv
	$(PY) -m launcher run configs/demo.yaml

# Tests. pytest's exit 5 ("no tests collected") is turned into a failure on purpose.
test: venv
	$(PY) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) runs .pytest_cache
