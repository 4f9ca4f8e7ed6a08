"""The Train section: `cldf train` as a child process, followed by the panel's timer, cancelled without waiting.

Cancel sends the child Ctrl-C and returns: the child saves the step in progress
and exits (or is killed when it does not in time, `trainrun.TrainingRun`); the
timer reports how it ended, and Train again resumes from its checkpoints.
"""

from __future__ import annotations

import shlex
from pathlib import Path


class Training:
    """``run`` is the `trainrun.TrainingRun` in progress, None when there is none."""

    def __init__(self, controller):
        self.controller = controller
        self.run = None

    @property
    def busy(self) -> bool:
        return self.run is not None

    def state(self) -> dict:
        run = self.run
        if run is None:
            return {}
        if run.stopping:
            return {"trainText": "Stopping training...", "trainEnabled": False, "trainProgress": (run.done, run.total),
                    "trainStatus": "saving the step in progress; it resumes from there"}
        status = f"{run.stage}: step {run.done} of {run.total}" if run.stage else (run.lines[-1] if run.lines else
                                                                                   "starting")
        return {"trainText": "Cancel training", "trainProgress": (run.done, run.total), "trainStatus": status}

    def startOrCancel(self) -> None:
        """The Train button, which reads Cancel training while a run goes on."""
        (self.cancel if self.run is not None else self.start)()

    def start(self) -> None:
        """`cldf train` on the manifest and settings in the parameters, as a child process (resumes when the
        output folder holds the checkpoints of the same command)."""
        from .trainrun import TrainingRun, trainCommand

        c, p = self.controller, self.controller.parameters
        try:
            if not _chosen(p.trainManifest) or not _chosen(p.trainOutput):
                raise ValueError("choose the manifest (e.g. from Save labels and manifest...) and an output folder")
            _checkPatients(p.trainManifest)
            channels = [ch.strip() for ch in p.trainChannels.split(",") if ch.strip()]
            args = trainCommand(p.trainManifest, p.trainOutput, channels, p.trainTarget, p.trainName,
                                p.trainTargetName or "target", device=p.device, extra=tuple(shlex.split(p.trainExtra)))
            run = TrainingRun(args)
            run.start()
        except Exception as e:
            c.panel.showError(f"Training could not start: {e}")
            c.refresh()
            return
        self.run = run
        c.panel.startTimer()
        c.refresh()

    def tick(self) -> None:
        """How the child ended, once it has: the new bundle selected, or why not."""
        run, c = self.run, self.controller
        if run is None or run.poll():
            return
        self.run = None
        if run.returncode == 0:
            c.chooseBundle(str(run.out))
            c.panel.showStatus(f"Training finished: the bundle in {run.out} is selected")
        elif run.returncode == 130:
            c.panel.showStatus("Training cancelled; press Train again to resume from its checkpoints")
        else:
            c.panel.showError(f"Training failed (exit code {run.returncode}):\n{run.error()}")

    def cancel(self) -> None:
        """Ctrl-C to the child and back to the event loop: it saves the step in progress and stops."""
        if self.run is not None:
            self.run.cancel()
        self.controller.refresh()


def _checkPatients(manifestPath: Path) -> None:
    """Too few patients for any split is refused here; `cldf train` checks the split it makes before any work."""
    from cldf.manifest import MIN_TRAIN_PATIENTS, load_manifest

    manifest = load_manifest(manifestPath)
    if len(manifest.cases) < MIN_TRAIN_PATIENTS:
        raise ValueError(f"{manifestPath} holds {len(manifest.cases)} labelled patient(s); training needs at least "
                         f"{MIN_TRAIN_PATIENTS} with slices labelled positive and negative (and more for validation "
                         "and testing): label more volumes and save the manifest again")


def _chosen(path: Path) -> bool:
    """A path field the user filled in (an empty one reads as '.')."""
    return str(path) not in ("", ".")
