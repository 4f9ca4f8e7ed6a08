"""The grids selection chooses a bundle's departures from on the validation patients (`cldf.trainer.select`,
`cldf.trainer.volume_select`); each key is a setting (``section.name``), each list its candidates.
"""

# The paper's value first in every list: ties keep the paper's setting.
DECODER_GRID = {
    "seeds.cam_threshold": ["otsu", 0.5],
    "decoder.lr_momentum": [(1.0, 0.0), (0.1, 0.9)],
}
# Slice gate: chosen first, by balanced accuracy of present / absent on validation slices
# (positive-slice Dice alone would always prefer no gate at all).
GATE_THRESHOLDS = [0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01]
SELECT_TRAIN_SLICES = 512  # positive training slices the selection's decoders train on, at most
CLUSTER_GRID = {
    "cluster.k": [2, 3, 5],
    "cluster.within_body": [False, True],
    "cluster.rule": ["nearest", "closer_than_background"],
    "cluster.seeded_components": [False, True],
}

# Chosen after everything else, on whole validation volumes: a mask that may be empty and one 3D object
# are judged by the per-case 3D Dice (false positives on slices without target count), the product's
# measure of a volume. "Off" first in every list: ties keep the plain pipeline.
POSTPROCESS_GRID = {
    "postprocess.min_similarity": [-1.0, 0.0, 0.25, 0.5, 0.75],
    "postprocess.require_seeds": [False, True],
    "postprocess.min_presence": [0.0, 0.1, 0.3, 0.5],
    "postprocess.min_component_fraction": [0.0, 0.1, 0.25, 0.5, 1.0],
}

# The student's whole-volume rule, chosen on whole validation volumes like the pipeline's ("off" first).
STUDENT_RULES = [0.0, 0.1, 0.25, 0.5]
# The student's probability threshold, chosen with its rule (the default first): a higher one cuts where a mask
# spills into neighbouring tissue at lower confidence. With LiteMedSAM the student's mask at the default threshold
# is what SAM redraws.
STUDENT_THRESHOLDS = [0.5, 0.7, 0.9]
