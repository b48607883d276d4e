# Two commands on a fresh clone:  make demo   and   make test
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch on machines without a GPU; override, e.g. TORCH="torch" for CUDA wheels.
TORCH  ?= torch==2.13.0
DEMO_OUT ?= out/demo

.PHONY: demo test install clean-venv

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/progidiff segment Resources/SampleData/sample-ct-abdomen.nii.gz --prompt liver --proposals 4 \
		-o $(DEMO_OUT) --overwrite
	@echo "Outputs in $(DEMO_OUT)/ ; look at $(DEMO_OUT)/overview.png"

test: $(VENV)/.installed
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q Testing

clean-venv:
	rm -rf $(VENV)
