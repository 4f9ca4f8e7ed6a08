# The two commands: `make demo` and `make test`. Both create (or reuse) .venv and install what they need.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DATA    ?= $(or $(CLDF_DATA),../shared/data)
MODELS  := CLDFSegmentation/Resources/Models
BRAIN   := $(MODELS)/brain-mri-flair-t1

.PHONY: demo test bundles bench evaluate screenshots clean

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

# Rebuilds the shipped bundles (hours each on 2 CPU cores, minutes on a GPU; resumes from checkpoints when rerun).
bundles: $(STAMP)
	$(VENV)/bin/cldf train --data $(DATA)/lgg/manifest.json --target 1 --channels FLAIR,T1 \
		--out $(BRAIN) --name brain-mri-flair-t1 --target-name tumour --seed 0
	$(VENV)/bin/cldf train --data $(DATA)/btcv/manifest.json --target 2,3 --channels CT \
		--out $(MODELS)/abdomen-ct-kidney --name abdomen-ct-kidney --target-name kidney --color 185,102,83 --seed 0
	$(VENV)/bin/cldf train --data $(DATA)/btcv/manifest.json --target 1 --channels CT \
		--out $(MODELS)/abdomen-ct-spleen --name abdomen-ct-spleen --target-name spleen --color 157,108,162 --seed 0

evaluate: $(STAMP)
	$(VENV)/bin/cldf evaluate --bundle $(BRAIN) --data $(DATA)/lgg/manifest.json --split test --out benchmarks/brain-test.json --record

# README screenshots, rendered headless through vtkMRMLSliceLogic by the rendering tests.
screenshots: $(STAMP)
	CLDF_SCREENSHOTS_DIR=Resources/Screenshots $(VENV)/bin/pytest -q Testing/test_rendering.py

bench: $(STAMP)
	$(VENV)/bin/cldf bench

clean:
	rm -rf demo-output .pytest_cache
