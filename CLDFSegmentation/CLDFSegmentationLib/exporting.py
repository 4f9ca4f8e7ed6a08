"""Export: the last run's segmentation as a label map file, on the grid of the input it was made on."""

from __future__ import annotations


class Exporting:
    """The Export button."""

    def __init__(self, controller):
        self.controller = controller

    def export(self) -> None:
        """Ask where, then write atomically (an earlier file is replaced only by a complete, checked one)."""
        c = self.controller
        outputs = c.parameters.outputs()
        if outputs is None:
            c.panel.showError("There is no segmentation to export: press Segment first.")
            return
        path = c.panel.askSavePath()
        if not path:
            return
        try:  # the save dialog has already asked before replacing a file
            written = c.logic.exportLabelmap(outputs["segmentation"], outputs["runInput"], path, overwrite=True)
        except Exception as e:
            c.panel.showError(f"The label map could not be written: {e}")
            return
        c.panel.showStatus(f"Label map written to {written}")
