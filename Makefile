# Two entry points, each doing all of its own set-up on a fresh machine:
#   make demo   the main job: `tgr demo`, train + evaluate + generate on the embedded default (offline)
#   make test   `make lint`, then the test suite (Triton kernels run under the interpreter when
#               there is no GPU)
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
# The CPU build of torch 2.13 lies on this project's machines; the GPU machine brings its own torch.
TORCH_SPEC  ?= torch==2.13.0
TRITON_SPEC ?= triton==3.7.1
# Run before the tests by `make test`, so that CI fails on lint (TEST_LINT= skips it).
TEST_LINT ?= lint

.PHONY: demo report lint test test-fast gpu-wheels clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	$(PY) -m pip install -q -e ".[dev,model]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m tgr demo

report: $(VENV)/.installed
	$(PY) -m tgr_kernels

lint: $(VENV)/.installed
	$(PY) -m ruff check .

test: $(TEST_LINT) $(VENV)/.installed
	$(PY) -m pytest -q tests benchmarks/test_runner.py benchmarks/test_gpu_run.py benchmarks/test_roofline.py benchmarks/test_host_overhead.py

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" tests

# The other fused losses that benchmarks/gpu_run.sh compares against, as wheels in .whl/ for a GPU
# machine without network (Python 3.12, x86-64 Linux); there:
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
gpu-wheels: $(VENV)/.installed
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache build dist
