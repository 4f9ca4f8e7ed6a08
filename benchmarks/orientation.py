"""The same scans stored in other orientations give the same mask in physical space.

Segments test patients of a bundle as stored and re-stored in other orientations (axes permuted and
flipped, the voxels unchanged), maps each mask back to the stored orientation and prints its Dice
against the mask of the scan as stored:

    .venv/bin/python benchmarks/orientation.py --bundle CLDFSegmentation/Resources/Models/brain-mri-flair-t1 \
        --data ../shared/data/lgg/manifest.json --cases 3
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from cldf import metrics
from cldf.bundle import load_bundle
from cldf.manifest import load_manifest
from cldf.orientation import orientation_of
from cldf.segment import Segmenter

ORIENTATIONS = ("RAS", "LPI", "ASL", "SRA")  # from LPS (the LGG files): flipped in-plane, slices reversed, sagittal, coronal


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--cases", type=int, default=2, help="the first N test patients of the bundle")
    args = p.parse_args()
    bundle = load_bundle(args.bundle)
    manifest = load_manifest(args.data)
    segmenter = Segmenter(bundle, "cpu")
    print("| case | stored as | mask voxels | " + " | ".join(f"Dice, stored as {o}" for o in ORIENTATIONS) + " |")
    print("|---|---|---|" + "---|" * len(ORIENTATIONS))
    for cid in bundle.card["training"]["split"]["test"][: args.cases]:
        case = manifest.case(cid)
        inputs = {c: case.channels[c] for c in bundle.channels}
        stored = orientation_of(sitk.ReadImage(str(inputs[bundle.channels[0]])))
        base = segmenter.start(inputs).run(progress=False).on_input_grid().mask > 0
        row = []
        with tempfile.TemporaryDirectory() as tmp:
            for code in ORIENTATIONS:
                moved = {}
                for c, path in inputs.items():
                    moved[c] = Path(tmp) / f"{code}-{c}.nrrd"
                    sitk.WriteImage(sitk.DICOMOrient(sitk.ReadImage(str(path)), code), str(moved[c]))
                result = segmenter.start(moved).run(progress=False).on_input_grid()
                image = sitk.GetImageFromArray(result.mask.astype(np.uint8))
                image.CopyInformation(result.reference)
                back = sitk.GetArrayFromImage(sitk.DICOMOrient(image, stored)) > 0
                row.append(metrics.dice(base, back))
        print(f"| {cid} | {stored} | {int(base.sum())} | " + " | ".join(f"{d:.4f}" for d in row) + " |")
    print(json.dumps({"bundle": bundle.id}))


if __name__ == "__main__":
    main()
