"""`cldf train` as a child process of the module: progress read from its output, cancel, resume.

The child is the `cldf` command (``python -m cldf train ...``) with Slicer's
Python, so training never runs in the application's process. Cancel sends it
Ctrl-C and returns: the child finishes the optimisation step in progress, saves
a checkpoint and exits, which `poll` notices; running the same command again
resumes from there.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from cldf.defaults import DEVICE, TARGET_NAME  # plain constants: no torch

#: a tqdm progress line: "cdm:  45%|████   | 1350/3000 [...]"
_PROGRESS = re.compile(r"^\s*([^:|]+?):\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")


def trainCommand(manifest: str | os.PathLike, out: str | os.PathLike, channels: list[str], target: str = "",
                 name: str = "", targetName: str = TARGET_NAME, preset: str = "cpu", device: str = DEVICE,
                 extra: tuple[str, ...] = ()) -> list[str]:
    """The arguments of `cldf train` (after the program) for the Train section's fields."""
    if not channels:
        raise ValueError("name the channels to train on, e.g. FLAIR,T1")
    args = ["train", "--data", str(manifest), "--out", str(out), "--channels", ",".join(channels),
            "--preset", preset, "--device", device, "--target-name", targetName]
    if target:
        args += ["--target", target]
    if name:
        args += ["--name", name]
    return args + list(extra)


def pythonExecutable() -> str:
    """Slicer's Python launcher inside Slicer, else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


class TrainingRun:
    """One `cldf train` child process; `poll()` from a timer, `cancel()` to stop it (resumable)."""

    def __init__(self, args: list[str], python: str | None = None, env: dict | None = None):
        self.args = list(args)
        self.command = [python or pythonExecutable(), "-m", "cldf", *self.args]
        self.env = env
        self.stage, self.done, self.total = "", 0, 0
        self.lines: list[str] = []  # the child's output, line by line (tqdm updates not included)
        self._process: subprocess.Popen | None = None
        self._output: queue.SimpleQueue = queue.SimpleQueue()
        self._reader: threading.Thread | None = None
        self._killAt: float | None = None  # when a cancelled child that has not exited is killed

    @property
    def out(self) -> Path:
        return Path(self.args[self.args.index("--out") + 1])

    @property
    def returncode(self) -> int | None:
        return self._process.returncode if self._process is not None else None

    def start(self) -> None:
        if self._process is not None:
            raise RuntimeError("this training run was started already; make a new one to resume")
        self._process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True)
        self._reader = threading.Thread(target=self._read, name="cldf train output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        """Reader thread: the child's output split at newlines and tqdm's carriage returns."""
        pending = b""
        while chunk := self._process.stdout.read1(4096):
            pending += chunk
            *parts, pending = re.split(rb"[\r\n]", pending)
            for part in parts:
                self._output.put(part.decode(errors="replace"))
        if pending:
            self._output.put(pending.decode(errors="replace"))

    def poll(self) -> bool:
        """Take in the output so far (stage, steps); True while the child runs."""
        while True:
            try:
                line = self._output.get_nowait()
            except queue.Empty:
                break
            match = _PROGRESS.match(line)
            if match:
                self.stage, self.done, self.total = match.group(1).strip(), int(match.group(2)), int(match.group(3))
                line = line[line.rfind("]") + 1 :] if "]" in line else ""  # a message printed after a bar
            if line.strip():
                self.lines.append(line.strip())
        if self._process.poll() is None:
            if self._killAt is not None and time.monotonic() > self._killAt:
                self._process.kill()  # a cancelled child that did not stop in time
            return True
        if self._reader.is_alive():  # the child has exited; its last output is still being read
            return True
        if not self._output.empty():
            return self.poll()
        return False

    @property
    def stopping(self) -> bool:
        """True between `cancel` and the child's exit."""
        return self._killAt is not None and self.returncode is None

    def cancel(self, timeout: float = 60.0) -> None:
        """Ctrl-C to the child (it saves the step in progress and exits) and return at once; `poll` kills it when
        it has not ended ``timeout`` seconds later."""
        if self._process is None or self._process.poll() is not None or self._killAt is not None:
            return
        self._process.send_signal(signal.SIGINT)
        self._killAt = time.monotonic() + timeout

    def error(self) -> str:
        """The child's last lines when it failed (what it said about why)."""
        return "\n".join(self.lines[-5:])
