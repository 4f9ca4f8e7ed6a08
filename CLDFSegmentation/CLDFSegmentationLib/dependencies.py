"""What the engine needs in Slicer's Python, and installing it without touching Slicer's own packages.

torch comes from the PyTorch extension (``PyTorchUtils``), which picks the
build for the machine's GPU; everything else from ``Resources/requirements.txt``.
numpy, SimpleITK and vtk belong to Slicer: pip runs with constraints that pin
them to the versions already there, so it can never reinstall them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import tempfile
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"
SLICER_OWN = ("numpy", "SimpleITK", "vtk")
# installed by the PyTorch extension for the machine's GPU; kept as they are when timm (which needs torchvision) is installed
TORCH_OWN = ("torch", "torchvision")
TORCH_REQUIREMENT = ">=2.1"
_LINE = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(?:(==|>=)\s*([A-Za-z0-9_.]+))?\s*$")


def requirements(path: Path = REQUIREMENTS) -> list[tuple[str, str, str]]:
    """``(name, operator, version)`` per line of requirements.txt (operator '' when unpinned)."""
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if match is None:
            raise ValueError(f"{path}: cannot read requirement '{line}' (use NAME, NAME==VERSION or NAME>=VERSION)")
        name, op, version = match.groups()
        out.append((name, op or "", version or ""))
    return out


def _satisfied(name: str, op: str, version: str) -> bool:
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    if op == "==":
        return installed == version
    if op == ">=":
        return _numbers(installed) >= _numbers(version)
    return True


def _numbers(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3])


def missingRequirements(path: Path = REQUIREMENTS) -> list[str]:
    """Requirements not installed (or too old), as pip arguments, e.g. ``['monai==1.6.1']``."""
    return [f"{n}{op}{v}" for n, op, v in requirements(path) if not _satisfied(n, op, v)]


def torchMissing() -> bool:
    return importlib.util.find_spec("torch") is None


def oldTorch() -> str | None:
    """The installed torch's version when it is older than `TORCH_REQUIREMENT`, else None."""
    try:
        installed = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None
    return installed if _numbers(installed) < _numbers(TORCH_REQUIREMENT) else None


def pytorchExtensionLogic():
    """The PyTorch extension's logic, or None when the extension is not installed."""
    import slicer

    try:
        return slicer.util.getModuleLogic("PyTorchUtils")
    except Exception:  # Slicer raises when no module of that name is loaded
        return None


def constraints() -> str:
    """pip constraints that keep Slicer's own packages, and torch and torchvision, exactly as installed."""
    lines = []
    for name in SLICER_OWN + TORCH_OWN:
        try:
            lines.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return "\n".join(lines) + "\n"


def installMissing() -> None:
    """Install torch (through PyTorchUtils) and the missing requirements. Call on the main thread only."""
    import slicer

    if torchMissing():
        torchLogic = pytorchExtensionLogic()
        if torchLogic is None:
            raise RuntimeError("PyTorch is needed: install the 'PyTorch' extension from the Extensions Manager, "
                               "restart Slicer and press Segment again")
        if torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT) is None:
            raise RuntimeError("PyTorch could not be installed; see the Python console for the reason")
    missing = missingRequirements()
    if missing:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write(constraints())
        slicer.util.pip_install(missing + ["-c", f.name])
        Path(f.name).unlink(missing_ok=True)
