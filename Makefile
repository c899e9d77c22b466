# The two set-up commands of the README (demo, test). Both create .venv on first use.
# `make notebooks` re-executes the notebooks in place (see the README's "Start here").
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test notebooks bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# The CPU wheel first: a bare 'torch' requirement would fetch a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	# open-clip-torch only for its CLIP BPE file (tokenizer parity test); --no-deps keeps
	# its torchvision requirement from replacing the CPU torch.
	$(PIP) install -q --no-deps open-clip-torch==3.3.0
	touch $@

demo: $(STAMP)
	$(PY) flowscale.py demo --out out/demo

test: $(STAMP)
	$(PY) -m pytest -q

# JupyterLab (with nbconvert) into the same .venv, then every notebook re-executed in place with the
# project's code, each in a fresh kernel started in notebooks/ (as tests/test_notebooks.py runs them),
# so that the stored figures are those of the current code. Open them with `.venv/bin/jupyter lab notebooks/`.
notebooks: $(STAMP)
	$(PIP) install -q "jupyterlab>=4" "nbconvert>=7"
	$(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=600 \
		--ExecutePreprocessor.kernel_name=python3 notebooks/*.ipynb

clean:
	rm -rf $(VENV) out .pytest_cache
