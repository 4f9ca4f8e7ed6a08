"""The README's Python section works as written, outside Slicer (real MRML from slicer-core)."""

from __future__ import annotations

import re
from pathlib import Path

import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]


def python_blocks() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("The same from Python"):text.index("Inputs that do not fit the bundle")]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_readme_python_blocks_segment_the_sample_and_export_a_label_map(mrml_scene, tmp_path, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) == 2
    monkeypatch.chdir(REPO)  # the blocks' paths are relative to the repository root
    namespace: dict = {}
    exec(compile(blocks[0], "README block 1", "exec"), namespace)
    monkeypatch.chdir(tmp_path)  # the export lands here, not in the repository
    namespace["path"] = str(REPO / namespace["path"])
    exec(compile(blocks[1], "README block 2", "exec"), namespace)
    mask = sitk.ReadImage(str(tmp_path / "mask.nii.gz"))
    flair = sitk.ReadImage(str(REPO / namespace["sample"] / "flair.nii.gz"))
    assert mask.GetSize() == flair.GetSize() and sitk.GetArrayFromImage(mask).any()
    assert namespace["result"].segmentation.GetName().startswith("FLAIR")
