# The two commands: `make demo` and `make test`. Both create (or reuse) .venv and install what they need.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DATA    ?= $(or $(CLDF_DATA),../shared/data)
MODELS  := CLDFSegmentation/Resources/Models
BRAIN   := $(MODELS)/brain-mri-flair-t1

.PHONY: demo test bundles bench bench-train evaluate results figure screenshots clean

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
# Each is trained into build/models/ and replaces the shipped one only once complete.
# AME-CAM is trained beside LayerCAM; which of the two seeds CLDF is chosen on the validation patients.
AME := --set ame_cam.enabled=true --set ame_cam.top_fraction=0.05 --set ame_cam.hard_negatives=0.5
# The abdominal bundles were trained with the narrow intensity augmentation (the CPU preset now uses the wide one).
NARROW := --set cam_classifier.intensity=narrow
# Kidney and spleen: the CAM classifier sees the patient's halves, never mirrored (see `cldf/sides.py`).
KIDNEY_SIDES := --set cam_classifier.sides=both --set cam_classifier.left_labels=[3] \
	--set cam_classifier.right_labels=[2] --set cam_classifier.flips=false
SPLEEN_SIDES := --set cam_classifier.sides=left --set cam_classifier.flips=false
NEW := build/models
install_bundle = rm -rf $(MODELS)/$(1) && mv $(NEW)/$(1) $(MODELS)/$(1)
bundles: $(STAMP)
	$(VENV)/bin/cldf train --data $(DATA)/lgg/manifest.json --target 1 --channels FLAIR,T1 \
		--out $(NEW)/brain-mri-flair-t1 --name brain-mri-flair-t1 --target-name tumour --seed 0 $(AME)
	$(call install_bundle,brain-mri-flair-t1)
	$(VENV)/bin/cldf train --data $(DATA)/btcv/manifest.json --target 2,3 --channels CT \
		--out $(NEW)/abdomen-ct-kidney --name abdomen-ct-kidney --target-name kidney --color 185,102,83 --seed 0 $(AME) $(NARROW) $(KIDNEY_SIDES)
	$(call install_bundle,abdomen-ct-kidney)
	$(VENV)/bin/cldf train --data $(DATA)/btcv/manifest.json --target 1 --channels CT \
		--out $(NEW)/abdomen-ct-spleen --name abdomen-ct-spleen --target-name spleen --color 157,108,162 --seed 0 $(AME) $(NARROW) $(SPLEEN_SIDES)
	$(call install_bundle,abdomen-ct-spleen)
	$(VENV)/bin/cldf train --data $(DATA)/btcv/manifest.json --target 6 --channels CT \
		--out $(NEW)/abdomen-ct-liver --name abdomen-ct-liver --target-name liver --color 221,130,101 --seed 0 $(AME) $(NARROW)
	$(call install_bundle,abdomen-ct-liver)

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
	CLDF_SCREENSHOTS_DIR=Resources/Screenshots $(VENV)/bin/pytest -q Testing/test_rendering.py

# A 155-slice brain volume (a real test patient resampled in z, as deep as a BraTS volume).
bench: $(STAMP)
	$(VENV)/bin/cldf bench --data $(DATA)/lgg/manifest.json --case TCGA_DU_6408_19860521 --depth 155 --out benchmarks/speed.md

# Training throughput (64 and 256 pixels, 1 and 2 processes), peak memory on 20 and 400 cases, slice-cache time.
bench-train: $(STAMP)
	$(VENV)/bin/cldf bench --train --data $(DATA)/lgg/manifest.json --out benchmarks/train.md

clean:
	rm -rf demo-output .pytest_cache
