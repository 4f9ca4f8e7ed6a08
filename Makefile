# The two commands: `make demo` and `make test`. Both create (or reuse) .venv and install what they need.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DATA    ?= $(or $(CLDF_DATA),../shared/data)
BRAIN   := CLDFSegmentation/Resources/Models/brain-mri-flair-t1

.PHONY: demo test bundles bench evaluate clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# pinned: a bare `torch` would pull several GB of CUDA packages
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cldf demo

test: $(STAMP)
	$(VENV)/bin/pytest -q

# Rebuilds the shipped brain bundle (hours on 2 CPU cores; resumes from its checkpoints when rerun).
bundles: $(STAMP)
	$(VENV)/bin/cldf train --data $(DATA)/lgg/manifest.json --target 1 --channels FLAIR,T1 \
		--out $(BRAIN) --name brain-mri-flair-t1 --target-name tumour --seed 0

evaluate: $(STAMP)
	$(VENV)/bin/cldf evaluate --bundle $(BRAIN) --data $(DATA)/lgg/manifest.json --split test --out benchmarks/brain-test.json --record

bench: $(STAMP)
	$(VENV)/bin/cldf bench

clean:
	rm -rf demo-output .pytest_cache
