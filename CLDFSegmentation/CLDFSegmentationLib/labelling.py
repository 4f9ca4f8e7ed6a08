"""Slice labels made in the panel (target present / absent) and the manifest `cldf train --data` reads."""

from __future__ import annotations


class Labelling:
    """Marks slices of the first input and writes the scene's labelled volumes as a dataset."""

    def __init__(self, controller):
        self.controller = controller

    def labelSlices(self, label: int, first: int | None = None, last: int | None = None) -> None:
        """Mark slices of the first input (default: the one in the slice view) target present (1) / absent (0) /
        unlabelled (-1); the labels are kept on the volume and saved with the scene."""
        from .chart import updateSliceLabels
        from .labels import markSlices, rememberChannels

        c = self.controller
        card, problem = c.bundleCard()
        inputs = c.parameters.inputVolumes(card.channels) if card else None
        if inputs is None:
            c.panel.showError(problem or "Select the volumes of every channel before labelling slices.")
            return
        volume = next(iter(inputs.values()))
        first = c.panel.currentSlice(volume) if first is None else first
        last = first if last is None else last
        try:
            labels = markSlices(volume, first, last, label)
        except ValueError as e:
            c.panel.showError(str(e))
            return
        rememberChannels(volume, inputs)
        outputs = c.parameters.outputs()
        if outputs is not None and outputs["runInput"] is volume:
            updateSliceLabels(outputs["table"], labels)  # the last run's chart shows them
        word = {1: "present", 0: "absent", -1: "unlabelled"}[label]
        c.panel.showStatus(f"'{volume.GetName()}' slices {min(first, last)}..{max(first, last)}: {word} "
                           f"({int((labels == 1).sum())} present, {int((labels == 0).sum())} absent)")

    def saveManifest(self) -> None:
        """Write every labelled volume of the scene, its labels and a manifest for `cldf train --data`."""
        import slicer

        from .labels import labelledCases, writeManifest

        c = self.controller
        folder = c.panel.askFolder()
        if not folder:
            return
        try:
            cases = labelledCases(slicer.mrmlScene)
            if not cases:
                raise ValueError("no volume has labelled slices yet")
            path = writeManifest(cases, folder)
        except Exception as e:
            c.panel.showError(f"The manifest could not be written: {e}")
            return
        c.panel.showStatus(f"{len(cases)} labelled case(s) and {path.name} written to {folder}")
