# The two set-up commands of the README. Both create .venv on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test bench clean

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

clean:
	rm -rf $(VENV) out .pytest_cache
