# The two commands: `make demo` and `make test`. Both create (or reuse) .venv and install what they need.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DATA    ?= $(or $(CLDF_DATA),../shared/data)
MODELS  := CLDFSegmentation/Resources/Models
COMMA   := ,
BRAIN   := $(MODELS)/brain-mri-flair-t1

.PHONY: demo test bundles students bench bench-train evaluate results figure screenshots clean

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
# Each is trained into build/models/ with its recipe (a preset named after it, `cldf/config/presets.py`)
# and replaces the shipped one only once complete.
NEW := build/models
train_bundle = $(VENV)/bin/cldf train --preset $(1) --data $(DATA)/$(2)/manifest.json --target $(3) \
	--out $(NEW)/$(1) --name $(1) --target-name $(4) $(if $(5),--color $(5)) --seed 0 \
	&& rm -rf $(MODELS)/$(1) && mv $(NEW)/$(1) $(MODELS)/$(1)
bundles: $(STAMP)
	$(call train_bundle,brain-mri-flair-t1,lgg,1,tumour,)
	$(call train_bundle,abdomen-ct-kidney,btcv,2$(COMMA)3,kidney,185$(COMMA)102$(COMMA)83)
	$(call train_bundle,abdomen-ct-spleen,btcv,1,spleen,157$(COMMA)108$(COMMA)162)
	$(call train_bundle,abdomen-ct-liver,btcv,6,liver,221$(COMMA)130$(COMMA)101)

# The student stage alone, for the shipped bundles made before it existed (`make bundles` trains it itself):
# the finished pipeline segments each bundle's training patients, a U-Net learns from those masks, the
# validation patients decide whether the bundle segments with it (minutes per bundle on 2 CPU cores).
STUDENTS := brain-mri-flair-t1:lgg abdomen-ct-kidney:btcv abdomen-ct-spleen:btcv abdomen-ct-liver:btcv
students: $(STAMP)
	$(foreach s,$(STUDENTS),$(VENV)/bin/cldf student --bundle $(MODELS)/$(word 1,$(subst :, ,$(s))) \
		--data $(DATA)/$(word 2,$(subst :, ,$(s)))/manifest.json &&) true

# Every method on each shipped bundle's test split (recorded into its bundle.json), then the results table.
BUNDLES := $(patsubst %/bundle.json,%,$(wildcard $(addsuffix /bundle.json,$(BRAIN) \
	$(MODELS)/abdomen-ct-kidney $(MODELS)/abdomen-ct-spleen $(MODELS)/abdomen-ct-liver)))
dataset = $(if $(findstring brain,$(1)),lgg,btcv)

results: $(STAMP)
	$(foreach b,$(BUNDLES),$(VENV)/bin/cldf evaluate --bundle $(b) --data $(DATA)/$(call dataset,$(b))/manifest.json \
		--split test --out benchmarks/$(notdir $(b))-test.json --overwrite --record &&) true
	$(VENV)/bin/cldf results $(foreach b,$(BUNDLES),--bundle $(b)) --out benchmarks/results.md

evaluate: results

# The paper's Fig. 3 per shipped bundle: image | ground truth | LayerCAM | MG | CDM | CLDF on three test slices.
figure: $(STAMP)
	$(foreach b,$(BUNDLES),$(VENV)/bin/cldf figure --bundle $(b) --data $(DATA)/$(call dataset,$(b))/manifest.json \
		--out benchmarks/figures/$(notdir $(b)).png &&) true

# README screenshots, rendered headless through vtkMRMLSliceLogic by the rendering tests.
screenshots: $(STAMP)
	CLDF_SCREENSHOTS_DIR=Resources/Screenshots $(VENV)/bin/pytest -q Testing/module/test_rendering.py

# A 155-slice brain volume (a real test patient resampled in z, as deep as a BraTS volume).
bench: $(STAMP)
	$(VENV)/bin/cldf bench --data $(DATA)/lgg/manifest.json --case TCGA_DU_6408_19860521 --depth 155 --out benchmarks/speed.md

# Training throughput (64 and 256 pixels, 1 and 2 processes), peak memory on 20 and 400 cases, slice-cache time.
bench-train: $(STAMP)
	$(VENV)/bin/cldf bench --train --data $(DATA)/lgg/manifest.json --out benchmarks/train.md

clean:
	rm -rf demo-output .pytest_cache
