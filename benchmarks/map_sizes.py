"""File sizes of the maps as `cldf segment` writes them (8-bit) against float32, on the shipped sample case.

    .venv/bin/python benchmarks/map_sizes.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from cldf.bundle import load_bundle
from cldf.outputs import map_to_uint8, write_volume
from cldf.segment import Segmenter

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "Resources" / "SampleData" / "TCGA_CS_6669_20020102"
BUNDLE = REPO / "CLDFSegmentation" / "Resources" / "Models" / "brain-mri-flair-t1"


def main() -> None:
    bundle = load_bundle(BUNDLE)
    inputs = {"FLAIR": SAMPLE / "flair.nii.gz", "T1": SAMPLE / "t1.nii.gz"}
    result = Segmenter(bundle, "cpu", refine="none").start(inputs).run(progress=False).on_input_grid()
    print(f"{bundle.id}, sample case, {result.cam.shape[0]} x {result.cam.shape[1]} x {result.cam.shape[2]} voxels\n")
    print("| map | float32 .nii.gz (bytes) | 8-bit .nii.gz (bytes) | ratio | largest quantisation error |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("cam", "mean_gradient"):
            values = getattr(result, name)
            full, small = Path(tmp) / f"{name}-f32.nii.gz", Path(tmp) / f"{name}-u8.nii.gz"
            write_volume(values.astype(np.float32), result.reference, full)
            write_volume(map_to_uint8(values), result.reference, small)
            error = float(np.abs(map_to_uint8(values) / 255.0 - values).max())
            print(f"| {name} | {full.stat().st_size:,} | {small.stat().st_size:,} | "
                  f"{full.stat().st_size / small.stat().st_size:.1f} | {error:.4f} |")


if __name__ == "__main__":
    main()
