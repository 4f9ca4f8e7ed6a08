"""Model bundles: a directory of ``.safetensors`` weights and a ``bundle.json`` card.

``bundle.json`` holds the format version, the task, the channel names in input
order, every setting (`CLDFConfig`), the training card, metrics, versions and
the sha256 of every weight file. Loading verifies every hash. Weights are
safetensors only: no pickle, so loading a bundle never runs code.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .ame_cam import AmeCam
from .config import CLDFConfig
from .decoder import PixelDecoder
from .models import NoiseSchedule, SliceClassifier, build_cdm

FORMAT_VERSION = 1
NETWORK_FILES = ("cdm", "noisy_classifier", "cam_classifier", "decoders")
OPTIONAL_FILES = ("ame_cam",)  # required only when bundle.json lists them


class BundleError(ValueError):
    """A bundle that cannot be used as it is; the message says why and what to do."""


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

    @property
    def channels(self) -> list[str]:
        return list(self.config.data.channels)

    @property
    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule(self.config.diffusion)

    @property
    def id(self) -> str:
        """Name and a short hash of the weights: identifies exactly what produced a result."""
        digest = hashlib.sha256("".join(sorted(self.card.get("files", {}).values())).encode()).hexdigest()[:12]
        return f"{self.card.get('name', 'bundle')}@{digest}"

    def untrained_cdm(self) -> torch.nn.Module:
        """The same CDM architecture, randomly initialised from the recorded seed (the Table 2 baseline)."""
        seed = int(self.card.get("untrained_cdm", {}).get("seed", 0))
        return untrained_cdm(self.config, seed).eval()


def untrained_cdm(config: CLDFConfig, seed: int) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build_cdm(config.diffusion, len(config.data.channels))


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
        tmp = path.with_suffix(".tmp")
        save_file({k: _stored(name, v) for k, v in networks[name].items()}, str(tmp))
        os.replace(tmp, path)
        files[path.name] = sha256(path)
    doc = {
        "format_version": FORMAT_VERSION,
        **card,
        "channels": list(config.data.channels),
        "config": config.to_dict(),
        "files": files,
        "versions": {"cldf": _version(), "torch": torch.__version__, "python": platform.python_version()},
    }
    tmp = out / "bundle.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, out / "bundle.json")
    return out


def replace_decoders(bundle_dir: str | Path, decoders: dict[str, dict[int, PixelDecoder]], **entries: Any) -> None:
    """Rewrite a verified bundle's decoders (and their hash) atomically, adding card entries."""
    root = Path(bundle_dir)
    card = read_card(root)
    path = root / "decoders.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in decoders_state(decoders).items()}, str(tmp))
    os.replace(tmp, path)
    update_card(root, files={**card["files"], path.name: sha256(path)}, **entries)


def update_card(bundle_dir: str | Path, **entries: Any) -> None:
    """Add or replace top-level card entries (metrics, selection) without touching the weights."""
    path = Path(bundle_dir) / "bundle.json"
    doc = json.loads(path.read_text())
    doc.update(entries)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def read_card(bundle_dir: str | Path) -> dict[str, Any]:
    """``bundle.json`` checked for format version and files, hashes verified."""
    root = Path(bundle_dir)
    path = root / "bundle.json"
    if not root.is_dir():
        raise FileNotFoundError(f"bundle directory not found: {root}")
    if not path.is_file():
        raise BundleError(f"{root} is not a CLDF bundle: it has no bundle.json")
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{path} is corrupted (not valid JSON: {e}); rebuild or re-download the bundle") from e
    version = card.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path} has format version {version!r}; this cldf reads version {FORMAT_VERSION}. "
            "Update CLDFSegmentation or rebuild the bundle with this version"
        )
    files = card.get("files", {})
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
    for net, name in ((cdm, "cdm"), (noisy, "noisy_classifier"), (cam, "cam_classifier")):
        try:
            net.load_state_dict(load_file(str(root / f"{name}.safetensors")))
        except RuntimeError as e:
            raise BundleError(f"{name}.safetensors does not fit the architecture in bundle.json: {e}") from e
        net.eval().requires_grad_(False)
    ame = None
    if "ame_cam.safetensors" in card["files"]:
        ame = AmeCam(config.ame_cam, n_in)
        try:
            ame.load_state_dict(load_file(str(root / "ame_cam.safetensors")))
        except RuntimeError as e:
            raise BundleError(f"ame_cam.safetensors does not fit the architecture in bundle.json: {e}") from e
        ame.eval().requires_grad_(False)
    return Bundle(root, config, card, cdm, noisy, cam, _load_decoders(root / "decoders.safetensors", config), ame)


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
