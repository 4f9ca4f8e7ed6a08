"""The README and docs/ against the code: the Python blocks run as written, and every link, repository path,
`make` target, preset and `--set` setting they name exists; CI runs the README's test command."""

from __future__ import annotations

import glob
import re
from pathlib import Path

import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
PYTHON_PAGE = REPO / "docs" / "slicer-module.md"
#: top-level folders whose paths the pages name; each named path must exist (globs must match)
CHECKED_ROOTS = ("training/", "CLDFSegmentation/", "Testing/", "benchmarks/", "Resources/", "docs/", ".ci/")


def text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def python_blocks() -> list[str]:
    page = text(PYTHON_PAGE)
    section = page[page.index("## From Python"):page.index("## Inputs it refuses")]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_python_blocks_segment_the_sample_and_export_a_label_map(mrml_scene, tmp_path, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) == 2
    monkeypatch.chdir(REPO)  # the blocks' paths are relative to the repository root
    namespace: dict = {}
    exec(compile(blocks[0], "docs/slicer-module.md block 1", "exec"), namespace)
    monkeypatch.chdir(tmp_path)  # the export lands here, not in the repository
    namespace["path"] = str(REPO / namespace["path"])
    exec(compile(blocks[1], "docs/slicer-module.md block 2", "exec"), namespace)
    mask = sitk.ReadImage(str(tmp_path / "mask.nii.gz"))
    flair = sitk.ReadImage(str(REPO / namespace["sample"] / "flair.nii.gz"))
    assert mask.GetSize() == flair.GetSize() and sitk.GetArrayFromImage(mask).any()
    assert namespace["result"].segmentation.GetName().startswith("FLAIR")


def commands(script: str) -> list[str]:
    return [line.split("#", 1)[0].strip() for line in script.splitlines()
            if line.strip() and not line.lstrip().startswith("#") and line.split("#", 1)[0].strip()]


def test_ci_runs_exactly_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)```", text(README), re.S)
    readme = [c for block in blocks for c in commands(block) if c.startswith("make test")]
    assert readme == ["make test"], readme
    ci = commands((REPO / ".ci" / "run").read_text())
    assert ci[-1] == readme[0] and not any(c.startswith(("make", "pytest", ".venv")) for c in ci[:-1]), ci


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", heading.strip().lower()))


def anchors(page: Path) -> set[str]:
    source = re.sub(r"```.*?```", "", text(page), flags=re.S)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", source, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_leads_to_a_file_and_heading_that_exist(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text(page)):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
            broken.append(target)
    assert not broken, f"{page.name}: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_repository_path_named_exists(page):
    named = set(re.findall(r"`((?:%s)[^`\s]*)`" % "|".join(map(re.escape, CHECKED_ROOTS)), text(page)))
    missing = sorted(p for p in named if not glob.glob(str(REPO / p.rstrip("/"))))
    assert not missing, f"{page.name} names paths that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_make_target_named_is_in_the_makefile(page):
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    named = set(re.findall(r"`make\s+([a-z][\w-]*)", text(page))) | set(re.findall(r"^make\s+([a-z][\w-]*)",
                                                                                  text(page), re.M))
    assert named <= targets, f"{page.name}: {sorted(named - targets)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_preset_and_setting_named_is_one_cldf_train_accepts(page):
    from cldf.config import PRESETS, apply_overrides, preset

    source = text(page)
    presets = set(re.findall(r"--preset[ =]([\w-]+)", source))
    assert presets <= set(PRESETS), f"{page.name}: unknown presets {sorted(presets - set(PRESETS))}"
    for item in re.findall(r"--set\s+([a-z_]+\.[a-z_]+=[^\s`)]+)", source):
        key, _, value = item.partition("=")
        item = item if value != "..." else f"{key}=0"
        try:
            apply_overrides(preset("cpu"), [item])
        except ValueError as err:
            if value != "..." or "is not a setting" in str(err):
                raise AssertionError(f"{page.name}: --set {item}: {err}") from None


def test_the_readme_and_docs_name_the_current_engine_paths_only():
    stale = ("training/cldf/config.py", "training/cldf/data.py", "training/cldf/training/", "cldf.training")
    found = [(page.name, s) for page in PAGES for s in stale if s in text(page)]
    assert not found, found
