"""The module's sample scan in Slicer's Sample Data module: a real LGG test patient, FLAIR and T1.

The files live in the repository's ``Resources/SampleData/<case>/`` (licence beside them), which the
extension installs beside the module's own resources; they are registered by local ``file://`` URI, so
loading them needs no network.
`sampleDataSources` is plain Python; only `registerSampleData` needs Slicer.
"""

from __future__ import annotations

from pathlib import Path

CATEGORY = "CLDF Segmentation"
SAMPLE_CASE = "TCGA_CS_6669_20020102"
_HERE = Path(__file__).resolve()
#: installed: beside the module's resources; in the source tree: the repository's Resources/
SAMPLE_DIR = next((d for d in (_HERE.parents[1] / "Resources" / "SampleData" / SAMPLE_CASE,
                               _HERE.parents[2] / "Resources" / "SampleData" / SAMPLE_CASE) if d.is_dir()),
                  _HERE.parents[2] / "Resources" / "SampleData" / SAMPLE_CASE)
#: channel -> (file in SAMPLE_DIR, its SHA256): the channels of the shipped brain bundle, in its order.
SAMPLE_FILES = {
    "FLAIR": ("flair.nii.gz", "1039b6a79a36ab3a92a22943b0788d84b20d1906c56e4f071cc31a0d240bc75f"),
    "T1": ("t1.nii.gz", "8005072da4ab575e057b0a8cf831e49f4c15cd15f964f3ae0b192b5400340c54"),
}


def sampleDataSources(sampleDir: Path = SAMPLE_DIR) -> list[dict]:
    """Keyword arguments of ``SampleDataLogic.registerCustomSampleDataSource``, one dict per sample."""
    files = [(channel, name, sha) for channel, (name, sha) in SAMPLE_FILES.items()]
    return [{
        "category": CATEGORY,
        "sampleName": SAMPLE_CASE,
        "uris": [(sampleDir / name).as_uri() for _, name, _ in files],
        "fileNames": [f"{SAMPLE_CASE}_{name}" for _, name, _ in files],  # names in Slicer's download cache
        "nodeNames": [f"{SAMPLE_CASE}_{channel}" for channel, _, _ in files],
        "checksums": [f"SHA256:{sha}" for _, _, sha in files],
    }]


def registerSampleData() -> None:
    """Add the sample to Slicer's Sample Data module (call once Slicer has started)."""
    import SampleData  # a Slicer module: only importable inside Slicer

    for source in sampleDataSources():
        SampleData.SampleDataLogic.registerCustomSampleDataSource(**source)
