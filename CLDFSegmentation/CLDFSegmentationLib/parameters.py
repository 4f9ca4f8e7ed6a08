"""The module's state, kept in its parameter node (a ``vtkMRMLScriptedModuleNode``) and nowhere else.

Inputs, bundle, device and display choices, and the output nodes of the last
run with the input they were made on: saved with the scene, gone with it, and
what the panel shows. Plain MRML (string parameters, node references), so the
state is the same in Slicer, in scripts and in the headless tests.
"""

from __future__ import annotations

from cldf.defaults import DEVICES  # plain constants: no torch

MAX_CHANNELS = 4
MAPS = ("cam", "meanGradient", "none")
RULES = ("nearest", "closer_than_background")  # as `cldf.cluster.RULES` (not imported: it needs the engine)
DEFAULT_OPACITY = 0.6

#: node-reference roles of the last run's outputs, and of the input they lie on
OUTPUT_ROLES = {"camVolume": "outputCAM", "meanGradientVolume": "outputMeanGradient",
                "segmentation": "outputSegmentation", "seedsVolume": "outputSeeds", "table": "outputTable"}
RUN_INPUT = "runInput"


class CLDFSegmentationParameters:
    """Typed access to the parameter node; every setter checks its value."""

    def __init__(self, node):
        self.node = node

    # ------------------------------------------------------------------ inputs
    def inputVolume(self, index: int):
        return self.node.GetNodeReference(_inputRole(index))

    def setInputVolume(self, index: int, volume) -> None:
        self.node.SetNodeReferenceID(_inputRole(index), volume.GetID() if volume is not None else None)

    def inputVolumes(self, channels: tuple[str, ...]) -> dict | None:
        """``{channel: node}`` in the bundle's order, or None while a channel has no volume."""
        nodes = {c: self.inputVolume(i) for i, c in enumerate(channels[:MAX_CHANNELS])}
        return nodes if nodes and all(n is not None for n in nodes.values()) else None

    @property
    def bundlePath(self) -> str:
        return self.node.GetParameter("bundlePath") or ""

    @bundlePath.setter
    def bundlePath(self, path: str) -> None:
        self.node.SetParameter("bundlePath", str(path))

    @property
    def device(self) -> str:
        return self.node.GetParameter("device") or "auto"

    @device.setter
    def device(self, device: str) -> None:
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, not '{device}'")
        self.node.SetParameter("device", device)

    # ------------------------------------------------------------------ display
    @property
    def shownMap(self) -> str:
        return self.node.GetParameter("shownMap") or "cam"

    @shownMap.setter
    def shownMap(self, which: str) -> None:
        if which not in MAPS:
            raise ValueError(f"map must be one of {MAPS}, not '{which}'")
        self.node.SetParameter("shownMap", which)

    @property
    def overlayOpacity(self) -> float:
        value = self.node.GetParameter("overlayOpacity")
        return float(value) if value else DEFAULT_OPACITY

    @overlayOpacity.setter
    def overlayOpacity(self, opacity: float) -> None:
        if not 0.0 <= opacity <= 1.0:
            raise ValueError(f"opacity must be in [0, 1], not {opacity}")
        self.node.SetParameter("overlayOpacity", repr(float(opacity)))

    @property
    def showMask(self) -> bool:
        return self.node.GetParameter("showMask") != "false"

    @showMask.setter
    def showMask(self, show: bool) -> None:
        self.node.SetParameter("showMask", "true" if show else "false")

    @property
    def showSeeds(self) -> bool:
        return self.node.GetParameter("showSeeds") == "true"

    @showSeeds.setter
    def showSeeds(self, show: bool) -> None:
        self.node.SetParameter("showSeeds", "true" if show else "false")

    # ------------------------------------------------------------------ deciding the mask (re-decided from the cache)
    @property
    def presenceThreshold(self) -> float | None:
        value = self.node.GetParameter("presenceThreshold")
        return float(value) if value else None

    @presenceThreshold.setter
    def presenceThreshold(self, threshold: float) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"the gate's presence threshold must be in [0, 1], not {threshold}")
        self.node.SetParameter("presenceThreshold", repr(float(threshold)))

    @property
    def clusterK(self) -> int | None:
        value = self.node.GetParameter("clusterK")
        return int(value) if value else None

    @clusterK.setter
    def clusterK(self, k: int) -> None:
        if not 2 <= int(k) <= 16:
            raise ValueError(f"K-means needs between 2 and 16 clusters, not {k}")
        self.node.SetParameter("clusterK", str(int(k)))

    @property
    def clusterRule(self) -> str | None:
        return self.node.GetParameter("clusterRule") or None

    @clusterRule.setter
    def clusterRule(self, rule: str) -> None:
        if rule not in RULES:
            raise ValueError(f"the foreground rule must be one of {RULES}, not '{rule}'")
        self.node.SetParameter("clusterRule", rule)

    # ------------------------------------------------------------------ training a bundle
    TRAINING_FIELDS = ("manifest", "output", "channels", "target", "name", "targetName", "extra")

    def training(self) -> dict[str, str]:
        """The Train section's fields: manifest, output folder, channels, target labels, bundle and target names,
        and extra `cldf train` arguments (e.g. ``--set diffusion.steps=8000``)."""
        return {f: self.node.GetParameter(f"train.{f}") or "" for f in self.TRAINING_FIELDS}

    def setTraining(self, **fields: str) -> None:
        unknown = set(fields) - set(self.TRAINING_FIELDS)
        if unknown:
            raise ValueError(f"unknown training field(s) {sorted(unknown)}; they are {self.TRAINING_FIELDS}")
        for f, value in fields.items():
            self.node.SetParameter(f"train.{f}", str(value))

    # ------------------------------------------------------------------ the last run
    def setOutputs(self, result, runInput) -> None:
        """Remember a finished run's output nodes and the input they lie on (None: forget them)."""
        for attribute, role in OUTPUT_ROLES.items():
            node = getattr(result, attribute) if result is not None else None
            self.node.SetNodeReferenceID(role, node.GetID() if node is not None else None)
        self.node.SetParameter("outputSegmentId", result.segmentId if result is not None else "")
        self.node.SetNodeReferenceID("outputChart", result.chart.GetID() if result is not None else None)
        self.node.SetNodeReferenceID(RUN_INPUT, runInput.GetID() if runInput is not None else None)

    def outputs(self) -> dict | None:
        """The last run's nodes (``camVolume``, ``meanGradientVolume``, ``segmentation``, ``segmentId``,
        ``runInput``), or None when there is none or one of them was deleted."""
        found = {attribute: self.node.GetNodeReference(role) for attribute, role in OUTPUT_ROLES.items()}
        found["runInput"] = self.node.GetNodeReference(RUN_INPUT)
        if any(n is None for n in found.values()):
            return None
        return found | {"segmentId": self.node.GetParameter("outputSegmentId")}


def _inputRole(index: int) -> str:
    if not 0 <= index < MAX_CHANNELS:
        raise ValueError(f"input index must be in 0..{MAX_CHANNELS - 1}, not {index}")
    return f"inputVolume{index}"
