"""Model bundles: a directory of ``.safetensors`` weights and a ``bundle.json`` card.

``bundle.json`` holds the format version, the task, the channel names in input
order, every setting (`CLDFConfig`), the training card, metrics, versions and
the sha256 of every weight file. Loading verifies every hash and the seal: a
sha256 over the settings, the task, the channels and the weight hashes, so an
edited setting or swapped weight files are refused as tampering. Weights are
safetensors only: no pickle, so loading a bundle never runs code.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from datetime import date
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import atomic
from .ame_cam import AmeCam
from .card import FORMAT_VERSION, BundleError, parse_card, seal
from .config import CLDFConfig
from .cpf_cte import CpfCte
from .decoder import PixelDecoder
from .models import NoiseSchedule, SliceClassifier, build_cdm, build_student
from .orientation import check_orientation
from .sides import check_sides, on_sides, sided
from .terminology import SegmentCode

NETWORK_FILES = ("cdm", "noisy_classifier", "cam_classifier", "decoders")
OPTIONAL_FILES = ("ame_cam", "student", "cpf_cte")  # required only when bundle.json lists them


@dataclass
class Bundle:
    """A loaded, verified bundle: settings, card and networks (on the CPU, in eval mode)."""

    path: Path | None
    config: CLDFConfig
    card: dict[str, Any]
    cdm: torch.nn.Module
    noisy_classifier: SliceClassifier
    cam_classifier: SliceClassifier
    decoders: dict[str, dict[int, PixelDecoder]] = field(default_factory=dict)
    ame_cam: AmeCam | None = None  # AME-CAM networks, when the bundle has ame_cam.safetensors
    student: torch.nn.Module | None = None  # the student U-Net, when the bundle has student.safetensors
    cpf_cte: CpfCte | None = None  # the CPF-CTE classifier, when the bundle has cpf_cte.safetensors

    @property
    def channels(self) -> list[str]:
        return list(self.config.data.channels)

    @property
    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule(self.config.diffusion)

    @property
    def slice_classifier(self) -> torch.nn.Module:
        """The CAM classifier as it judges whole slices: on their halves when ``cam_classifier.sides`` says so."""
        return sided(self.cam_classifier, self.config.cam_classifier.sides, self.config.data.orientation)

    def on_sides(self, cam):
        """A CAM source of the CAM classifier, run on half slices when ``cam_classifier.sides`` says so."""
        return on_sides(cam, self.config.cam_classifier.sides, self.config.data.orientation)

    @property
    def id(self) -> str:
        """Name and a short hash of weights and settings (the seal): identifies exactly what produced a result."""
        return f"{self.card.get('name', 'bundle')}@{self.card.get('seal', seal(self.card))[:12]}"

    def untrained_cdm(self) -> torch.nn.Module:
        """The same CDM architecture, randomly initialised from the recorded seed (the Table 2 baseline)."""
        seed = int(self.card.get("untrained_cdm", {}).get("seed", 0))
        return untrained_cdm(self.config, seed).eval()


def untrained_cdm(config: CLDFConfig, seed: int) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_cdm(config.diffusion, len(config.data.channels))


def write_card(path: Path, doc: dict[str, Any]) -> None:
    """``bundle.json`` with a fresh seal, written atomically."""
    doc = {**doc, "format_version": FORMAT_VERSION}
    doc["seal"] = seal(doc)
    atomic.write_json(path, doc)


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a weight file atomically, readable as the user's umask allows (safetensors alone makes it 0600)."""
    with atomic.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~atomic.current_umask())


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def decoders_state(decoders: dict[str, dict[int, PixelDecoder]]) -> dict[str, torch.Tensor]:
    return {f"{variant}.{seed}.{k}": v for variant, by_seed in decoders.items() for seed, d in by_seed.items() for k, v in d.state_dict().items()}


HALF_PRECISION = ("ame_cam",)  # stored as float16 (its ResNet widths would make an 11 MB file); loaded as float32


def _stored(name: str, tensor):
    t = tensor.detach().cpu().contiguous()
    return t.half() if name in HALF_PRECISION and t.is_floating_point() else t


def save_bundle(
    out: str | Path,
    config: CLDFConfig,
    networks: dict[str, dict[str, torch.Tensor]],
    card: dict[str, Any],
) -> Path:
    """Write weights and ``bundle.json`` (with hashes) into ``out``; ``bundle.json`` last and atomically.

    ``networks`` holds every name of `NETWORK_FILES` and may hold those of `OPTIONAL_FILES`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in NETWORK_FILES + tuple(n for n in OPTIONAL_FILES if n in networks):
        path = out / f"{name}.safetensors"
        write_safetensors({k: _stored(name, v) for k, v in networks[name].items()}, path)
        files[path.name] = sha256(path)
    doc = {
        "format_version": FORMAT_VERSION,
        **card,
        "channels": list(config.data.channels),
        "config": config.to_dict(),
        "files": files,
        "versions": {"cldf": _version(), "torch": torch.__version__, "python": platform.python_version()},
    }
    write_card(out / "bundle.json", doc)
    return out


def replace_decoders(bundle_dir: str | Path, decoders: dict[str, dict[int, PixelDecoder]], **entries: Any) -> None:
    """Rewrite a verified bundle's decoders (and their hash) atomically, adding card entries."""
    root = Path(bundle_dir)
    card = read_card(root)
    path = root / "decoders.safetensors"
    write_safetensors({k: v.detach().cpu().contiguous() for k, v in decoders_state(decoders).items()}, path)
    update_card(root, files={**card["files"], path.name: sha256(path)}, **entries)


def add_network(bundle_dir: str | Path, name: str, state: dict[str, torch.Tensor], **entries: Any) -> None:
    """Add (or replace) an optional network's weight file of a verified bundle, adding card entries; resealed."""
    if name not in OPTIONAL_FILES:
        raise ValueError(f"'{name}' is not an optional network of a bundle ({', '.join(OPTIONAL_FILES)})")
    root = Path(bundle_dir)
    card = read_card(root)
    path = root / f"{name}.safetensors"
    write_safetensors({k: _stored(name, v) for k, v in state.items()}, path)
    update_card(root, files={**card["files"], path.name: sha256(path)}, **entries)


def update_card(bundle_dir: str | Path, **entries: Any) -> None:
    """Add or replace top-level card entries (metrics, selection, settings) without touching the weights; resealed."""
    path = Path(bundle_dir) / "bundle.json"
    if not os.access(path, os.W_OK) or not os.access(path.parent, os.W_OK):
        raise BundleError(f"{path} is read-only: copy the bundle to a folder you can write to first")
    doc = json.loads(path.read_text())
    doc.update(entries)
    write_card(path, doc)


CORRECTABLE = ("data.orientation", "data.ct_window")  # what the training scans were, not what the networks learnt


def correct_setting(bundle_dir: str | Path, key: str, value: Any, because: str, command: str = "") -> dict[str, Any]:
    """Make a card say what its training scans really were; the weights stay as they are.

    ``data.orientation``: for a bundle trained on files whose headers misstated their orientation (right voxels,
    wrong direction), the orientation its training arrays really had, which files with corrected headers then
    report. ``data.ct_window``: the Hounsfield window 8-bit CT training scans were made with, so that inputs in
    HU go through it (`cldf.hounsfield`). The change, its reason and the seal it replaces are appended to the
    card's ``corrections``; resealed, after the new settings pass every rule of `CLDFConfig`.

    Returns:
        The correction entry.
    """
    root = Path(bundle_dir)
    card = read_card(root)  # a tampered card is refused, never resealed
    if key not in CORRECTABLE:
        raise ValueError(f"{key} is not a setting a card may correct ({', '.join(CORRECTABLE)})")
    if not because.strip():
        raise ValueError(f"say why the recorded {key} is wrong (e.g. which headers were corrected)")
    section, name = key.split(".")
    config = card["config"]
    if key == "data.orientation":
        value = check_orientation(value)
        check_sides(config.get("cam_classifier", {}).get("sides", "whole"), value)
    before = config[section].get(name, CLDFConfig().get(key))
    if before == value:
        raise ValueError(f"{root / 'bundle.json'} already records {key} = {value}; nothing to correct")
    corrected = {**config, section: {**config[section], name: value}}
    CLDFConfig.from_dict(corrected)  # every setting's rule, before anything is written
    entry = {"setting": key, "from": before, "to": value, "because": because.strip(),
             "seal_before": card["seal"], "command": command, "date": date.today().isoformat()}
    update_card(root, config=corrected, corrections=[*card.get("corrections", []), entry])
    return entry


def set_segment_code(bundle_dir: str | Path, code: SegmentCode, command: str = "") -> dict[str, Any]:
    """Record the target's standard codes in the card (``task.code``) and reseal it; the weights stay as they are.

    The change and the seal it replaces are appended to the card's ``corrections``, as `correct_setting` does.
    """
    root = Path(bundle_dir)
    card = read_card(root)
    task = card.get("task") or {}
    before = task.get("code")
    if before == code.to_card():
        raise ValueError(f"{root / 'bundle.json'} already records the code {code}; nothing to change")
    entry = {"setting": "task.code", "from": before, "to": code.to_card(), "because": "the target's standard codes",
             "seal_before": card["seal"], "command": command, "date": date.today().isoformat()}
    update_card(root, task={**task, "code": code.to_card()}, corrections=[*card.get("corrections", []), entry])
    return entry


def read_card(bundle_dir: str | Path) -> dict[str, Any]:
    """``bundle.json`` checked for format version, files and seal (`card.parse_card`), hashes verified."""
    root = Path(bundle_dir)
    path = root / "bundle.json"
    card = parse_card(root)
    files = card["files"]
    for name in NETWORK_FILES + tuple(n for n in OPTIONAL_FILES if f"{n}.safetensors" in files):
        fname = f"{name}.safetensors"
        if fname not in files:
            raise BundleError(f"{path} lists no hash for {fname}; the bundle is incomplete")
        if not (root / fname).is_file():
            raise BundleError(f"bundle file missing: {root / fname}; rebuild or re-download the bundle")
        if sha256(root / fname) != files[fname]:
            raise BundleError(
                f"{root / fname} does not match the sha256 recorded in bundle.json: the file was modified "
                "or corrupted. Refusing to load it; rebuild or re-download the bundle"
            )
    return card


def load_bundle(bundle_dir: str | Path) -> Bundle:
    """Verify and load a bundle (see `read_card` for what is checked)."""
    root = Path(bundle_dir)
    card = read_card(root)
    try:
        config = CLDFConfig.from_dict(card["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{root / 'bundle.json'} has an unusable 'config' section: {e}") from e
    if card.get("channels") != list(config.data.channels):
        raise BundleError(f"{root / 'bundle.json'}: 'channels' {card.get('channels')} disagree with the config's")
    n_in = len(config.data.channels)
    cdm = build_cdm(config.diffusion, n_in)
    noisy = SliceClassifier(config.noisy_classifier, n_in)
    cam = SliceClassifier(config.cam_classifier, n_in)
    nets = {"cdm": cdm, "noisy_classifier": noisy, "cam_classifier": cam}
    ame = None
    if "ame_cam.safetensors" in card["files"]:
        nets["ame_cam"] = ame = AmeCam(config.ame_cam, n_in)
    student = None
    if "student.safetensors" in card["files"]:
        nets["student"] = student = build_student(config.student, n_in)
    cpf = None
    if "cpf_cte.safetensors" in card["files"]:
        nets["cpf_cte"] = cpf = CpfCte(config.cpf_cte, n_in, config.data.resolution)
    for name, net in nets.items():
        net.load_state_dict(_read_weights(root / f"{name}.safetensors", net))
        net.eval().requires_grad_(False)
    try:
        decoders = _load_decoders(root / "decoders.safetensors", config)
    except (RuntimeError, ValueError, KeyError) as e:
        raise BundleError(f"decoders.safetensors does not fit the decoders in bundle.json: {e}") from None
    return Bundle(root, config, card, cdm, noisy, cam, decoders, ame, student, cpf)


def _read_weights(path: Path, net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A weight file's tensors, checked against the network's names and shapes (float16 files come back float32)."""
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for truncated or malformed files
        raise BundleError(f"{path} is not a readable weight file ({e}); rebuild or re-download the bundle") from None
    expected = net.state_dict()
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
        raise BundleError(f"{path.name} does not fit the architecture in bundle.json (other names or shapes); "
                          "rebuild or re-download the bundle")
    return {k: v.to(expected[k].dtype) for k, v in state.items()}


def _load_decoders(path: Path, config: CLDFConfig) -> dict[str, dict[int, PixelDecoder]]:
    state = load_file(str(path))
    grouped: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        variant, seed, rest = key.split(".", 2)
        grouped.setdefault((variant, int(seed)), {})[rest] = value
    out: dict[str, dict[int, PixelDecoder]] = {}
    for (variant, seed), sd in sorted(grouped.items()):
        out.setdefault(variant, {})[seed] = PixelDecoder(config.decoder).load_state_dict(sd)
    return out


def _version() -> str:
    try:
        return version("cldf")
    except PackageNotFoundError:
        return "unknown"
