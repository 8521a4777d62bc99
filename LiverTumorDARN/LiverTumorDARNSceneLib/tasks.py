"""The panel's two kinds of work, without Qt: "Segment tumors" in a worker process
(:class:`SegmentationJob`) and clicks on a refinement thread (:class:`ClickSession`).

The module's widget only connects its buttons and a timer to these classes, its Logic runs them to
the end (for the Python console and the module's test), and CI runs them on Slicer's real MRML
classes (``slicer-core``) with a real worker process. Only the thread that calls ``poll`` (Slicer's
main thread) touches MRML nodes: the worker gets the CT as a file, the refinement thread gets numpy
arrays, and ``poll`` writes their results into the scene.

Only the standard library is imported here at the top: the panel imports this module before it has
asked to install the packages that first use installs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

if TYPE_CHECKING:
    import numpy as np

    from LiverTumorDARNLib.refine import Change, Refiner
    from LiverTumorDARNLib.report import CaseReport

MODULE_DIR = Path(__file__).resolve().parents[1]
"""The folder that holds LiverTumorDARNLib and LiverTumorDARNSceneLib: the worker's import path."""

WORKER_MODULE = "LiverTumorDARNSceneLib.worker"
POLL_SECONDS = 0.1
PANEL_POLL_MILLISECONDS = 10
"""How often the panel's timer writes what finished: a click's result waits for the next tick, so
the tick is short (a tick with nothing finished costs microseconds)."""
STAGE_NAMES = {"liver": "Finding the liver", "tumor": "Segmenting tumors", "done": "Writing the segments"}
"""What the panel calls each stage the worker reports."""

_OUTPUT_ENDED = object()
log = logging.getLogger(__name__)


def _ignore(*args) -> None:
    """A callback nobody asked for."""


# --------------------------------------------------------------------------------------------
# A worker process and everything it starts


def _own_process_group() -> dict:
    """Popen options that put the worker, and every process it starts, in a group of their own."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
    return {"start_new_session": True}


def end_process_tree(process: subprocess.Popen) -> None:
    """Stop a worker and every process it started, then reap it.

    ``PythonSlicer`` is a launcher (CTK's AppLauncher) that runs ``python-real`` as its child, so
    killing the launcher alone would leave the network running. On Linux and macOS the worker leads
    a session of its own (see :func:`_own_process_group`), and one signal to that process group
    reaches them all; on Windows ``taskkill /T`` ends the tree.
    """
    if process.poll() is None:
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False)
        else:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        process.kill()  # where the tree could not be ended: the worker at least
    process.wait()


def parse_record(line: str) -> dict:
    """One line of the worker as its record: a JSON object, else ``{"output": line}`` (a warning,
    a traceback line)."""
    text = line.strip()
    try:
        record = json.loads(text)
    except ValueError:
        return {"output": text}
    return record if isinstance(record, dict) else {"output": text}


class WorkerProcess:
    """A process whose output lines are read on a thread of their own into records
    (:func:`parse_record`), so that the caller polls without ever blocking.

    It runs in a process group of its own, and :meth:`stop` ends the whole group. Whatever still runs
    when the interpreter exits (Slicer closing) is stopped too.
    """

    def __init__(self, command: Sequence[str], environment: Mapping[str, str] | None = None):
        self._records: queue.Queue = queue.Queue()
        self._output_ended = False
        self._process = subprocess.Popen(
            [str(part) for part in command], env=None if environment is None else dict(environment),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, encoding="utf-8", errors="replace", **_own_process_group())
        self._stop = weakref.finalize(self, end_process_tree, self._process)
        threading.Thread(target=self._read, name="LiverTumorDARN-worker-output", daemon=True).start()

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process.poll() is None

    def _read(self) -> None:
        with self._process.stdout:
            for line in self._process.stdout:
                self._records.put(parse_record(line))
        self._records.put(_OUTPUT_ENDED)

    def records(self) -> list[dict]:
        """What the worker reported since the last call, in order."""
        found = []
        while True:
            try:
                record = self._records.get_nowait()
            except queue.Empty:
                return found
            if record is _OUTPUT_ENDED:
                self._output_ended = True
            else:
                found.append(record)

    def exit_status(self) -> int | None:
        """The exit status, once the worker has exited and :meth:`records` has returned every line
        it wrote; None before. (A worker may print its error and exit a while later: its status
        alone says nothing until its last line is read.)"""
        return self._process.poll() if self._output_ended else None

    def stop(self) -> None:
        """End the worker and every process it started (nothing happens when it has exited)."""
        self._stop()


# --------------------------------------------------------------------------------------------
# "Segment tumors"


@dataclasses.dataclass(frozen=True)
class SegmentationOptions:
    """What a "Segment tumors" run is asked for, besides its nodes."""

    models_dir: Path | None = None  # None: the bundled weights
    device: str = "auto"  # "auto", "cpu" or "cuda"
    per_tumor: bool = False  # one segment per tumor
    keep_uncertain_tumors: bool = False  # no confidence floor: every tumor the network marks


def worker_command(python: Sequence[str], ct_path: Path, labels_path: Path, options: SegmentationOptions,
                   name: str) -> list[str]:
    """The worker's command line; ``python`` runs Python (``PythonSlicer`` in Slicer)."""
    command = [*python, "-m", WORKER_MODULE, str(ct_path), str(labels_path), "--device", options.device, "--name", name]
    if options.models_dir is not None:
        command += ["--models", str(options.models_dir)]
    if options.keep_uncertain_tumors:
        command += ["--min-tumor-confidence", "0"]
    return command


def worker_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the module's folder first on PYTHONPATH."""
    environment = dict(os.environ if base is None else base)
    environment["PYTHONPATH"] = os.pathsep.join(path for path in (str(MODULE_DIR), environment.get("PYTHONPATH", "")) if path)
    return environment


class SegmentationJob:
    """One "Segment tumors": the CT of ``volume_node`` written to a work folder, the worker process
    started on it, and at the end its label map written into ``segmentation_node`` and (when given)
    ``table_node``. Constructing the job starts it.

    ``on_progress(stage, fraction)`` and ``on_message(text)`` pass on what the worker reports
    (:data:`STAGE_NAMES` names the stages); ``messages`` keeps the messages for the end. ``python`` is the command that runs Python with the
    core's packages (``PythonSlicer`` in Slicer, this interpreter by default) and ``environment``
    the environment it starts in. Cancelling ends the worker's whole process tree; either way the
    work folder is removed.
    """

    def __init__(self, volume_node, segmentation_node, table_node=None,
                 options: SegmentationOptions = SegmentationOptions(), python: Sequence[str] = (sys.executable,),
                 environment: Mapping[str, str] | None = None,
                 on_progress: Callable[[str, float], None] = _ignore, on_message: Callable[[str], None] = _ignore):
        import SimpleITK as sitk

        from . import scene

        self.volume_node, self.segmentation_node, self.table_node = volume_node, segmentation_node, table_node
        self.options, self.on_progress, self.on_message = options, on_progress, on_message
        self.report: CaseReport | None = None
        self.messages: list[str] = []
        self.finished = self.cancelled = False
        self._error = self._last_output = ""
        self.work_folder = Path(tempfile.mkdtemp(prefix="LiverTumorDARN-"))
        try:
            ct_path = self.work_folder / "ct.nrrd"
            sitk.WriteImage(scene.image_from_volume(volume_node), str(ct_path))
            command = worker_command(python, ct_path, self._labels_path, options, volume_node.GetName())
            self._worker = WorkerProcess(command, worker_environment(environment))
        except BaseException:
            shutil.rmtree(self.work_folder, ignore_errors=True)
            raise

    @property
    def _labels_path(self) -> Path:
        return self.work_folder / "labels.nrrd"

    @property
    def worker_pid(self) -> int:
        return self._worker.pid

    @property
    def worker_running(self) -> bool:
        return self._worker.running

    def poll(self) -> bool:
        """Pass on what the worker reported since the last call; True once the job is over (its
        result written into the scene, or cancelled).

        When the worker has ended with an error, this raises it: an InputError with the worker's
        own message when it gave one (however long after it the worker exited), else a
        RuntimeError with the exit status and the worker's last line. Call it on the thread that
        owns the scene. A call from inside ``on_progress`` or ``on_message`` (a dialog's event loop
        runs the panel's timer) finishes the job; the outer call then returns True.
        """
        if self.finished:
            return True
        for record in self._worker.records():
            self._handle(record)
        if self.finished:
            return True
        status = self._worker.exit_status()
        if status is None:
            return False
        self.finished = True
        try:
            if status != 0:
                raise self._failure(status)
            self._write_result()
        finally:
            self._close()
        return True

    def wait(self) -> CaseReport | None:
        """Poll until the job is over; the report of the written segments (None when cancelled)."""
        while not self.poll():
            time.sleep(POLL_SECONDS)
        return self.report

    def cancel(self) -> None:
        """End the worker and every process it started; nothing is written into the scene."""
        if not self.finished:
            self.finished = self.cancelled = True
            self._close()

    def _handle(self, record: dict) -> None:
        if "stage" in record:
            self.on_progress(record["stage"], float(record.get("fraction", 0.0)))
        elif "message" in record:
            self.messages.append(str(record["message"]))
            self.on_message(self.messages[-1])
        elif "error" in record:
            self._error = str(record["error"])
        elif record.get("output"):
            self._last_output = record["output"]
            log.info("segmentation worker: %s", record["output"])

    def _failure(self, status: int) -> Exception:
        from LiverTumorDARNLib.errors import InputError

        if self._error:
            return InputError(self._error)
        detail = f": {self._last_output}" if self._last_output else ""
        return RuntimeError(f"The segmentation process stopped with status {status}{detail}")

    def _write_result(self) -> None:
        import SimpleITK as sitk

        from . import scene

        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(self._labels_path)))
        scene.write_segments(self.segmentation_node, self.volume_node, labels, self.options.per_tumor)
        self.report = scene.measure(scene.image_from_volume(self.volume_node), labels)
        if self.table_node is not None:
            scene.write_results_table(self.table_node, self.report)

    def _close(self) -> None:
        self._worker.stop()
        shutil.rmtree(self.work_folder, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Clicks and "Refine all"


@dataclasses.dataclass(frozen=True)
class Edit:
    """A refinement written into the segments: what it did, in words, and the report after it
    (None while it is measured: ``ClickSession.poll`` writes the segments first)."""

    message: str
    report: CaseReport | None


class ClickSession:
    """Clicks, "Refine all" and their undo, for one refinement network.

    The network runs on one thread that lives as long as the session, so it is loaded once
    (``load_refiner`` runs there on the first edit) and its caches stay warm between clicks. The
    CT and the labels are read from the scene when an edit is asked for (kept from the last edit
    while the scene's volume and segments are as that edit left them), the result is written by
    :meth:`poll`, both on the calling thread. The report is measured on the session's thread
    after the segments are written: measuring every tumor of a thin-slice scan takes longer than
    the click (0.4 s on two cores), and the reader looks at the segments first. Each written edit
    can be taken back with :meth:`undo`: the session keeps its own history of the segments
    (Slicer's vtkSegmentationHistory), and never touches the Segment Editor's.
    """

    def __init__(self, load_refiner: Callable[[], Refiner]):
        self._load_refiner = load_refiner
        self._refiner: Refiner | None = None
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="LiverTumorDARN-clicks")
        self._pending = None
        self._measuring = None  # the last written edit's report being measured: (future, the edit's message)
        self._histories: dict = {}
        self._edits: dict = {}  # per segmentation, what made each state of its history: a click ((i, j, k), positive) or None
        self._read: dict = {}  # ("ct", volume) or ("labels", segmentation): (the scene's state when read, what was read)

    @property
    def busy(self) -> bool:
        """An edit is running, or its report is measured; the panel keeps polling."""
        return self._pending is not None or self._measuring is not None

    def click(self, volume_node, segmentation_node, point_ras, positive: bool = True) -> bool:
        """Start a click at a world RAS point (see ``Refiner.click``, which is given the earlier
        clicks that edited these segments and were not undone); False while an edit runs."""
        from . import scene

        point_ijk = scene.ras_to_ijk(volume_node, point_ras)
        earlier = self._earlier_clicks(segmentation_node)
        return self._start(volume_node, segmentation_node,
                           lambda refiner, ct, labels: refiner.click(ct, labels, point_ijk, positive, earlier),
                           (point_ijk, positive))

    def refine_all(self, volume_node, segmentation_node) -> bool:
        """Start refining every tumor of the module's segments; False while an edit runs."""
        return self._start(volume_node, segmentation_node, lambda refiner, ct, labels: refiner.refine_all(ct, labels))

    def poll(self, table_node=None) -> Edit | None:
        """What finished since the last poll, written. A finished edit: written into its
        segments (only the changed box), the state before it kept for undo, its report started on
        the session's thread, and returned with no report. A finished report: written into the
        results table and returned with its edit's message. None while nothing finished or when
        nothing was started. Raises the edit's error, leaving the segments as they were."""
        if self._pending is not None and self._pending[0].done():
            return self._write_edit()
        if self._measuring is not None and self._measuring[0].done():
            future, message = self._measuring
            self._measuring = None
            return self._edit(message, future.result(), table_node)
        return None

    def wait(self, table_node=None) -> Edit | None:
        """Wait for the running edit and its report and write both (see :meth:`poll`): the edit
        with its report, or None when none was started."""
        edit = None
        while self.busy:
            concurrent.futures.wait([(self._pending or self._measuring)[0]])
            edit = self.poll(table_node)
        return edit

    def _write_edit(self) -> Edit:
        future, volume_node, segmentation_node, ct, made_by = self._pending
        self._pending = None
        change: Change = future.result()
        from . import scene

        if change.box is not None:
            self._history(segmentation_node).SaveState()
            scene.apply_change(segmentation_node, volume_node, change.labels, change.box,
                               self._unedited_labels(volume_node, segmentation_node))
            self._edits.setdefault(self._key(segmentation_node), []).append(made_by)
            self._read[("labels", segmentation_node)] = (scene.segments_state(segmentation_node, volume_node), change.labels)
        self._measuring = (self._thread.submit(scene.measure, ct, change.labels), change.message)
        return Edit(change.message, None)

    def undo(self, volume_node, segmentation_node, table_node=None) -> Edit | None:
        """Take back the last edit of ``segmentation_node`` (several in turn, up to the history's
        length); None when there is nothing to take back."""
        from . import scene

        self._stop_measuring()
        history = self._histories.get(self._key(segmentation_node))
        if history is None or not history.IsRestorePreviousStateAvailable() or not history.RestorePreviousState():
            return None
        edits = self._edits.get(self._key(segmentation_node))
        if edits:
            edits.pop()
        return self._edit("last refinement undone", scene.measure_segments(segmentation_node, volume_node), table_node)

    def close(self) -> None:
        """Let the refinement thread end once its edit is done (the scene is not touched again)."""
        self._pending = None
        self._stop_measuring()
        self._thread.shutdown(wait=False)

    def _start(self, volume_node, segmentation_node, edit: Callable, made_by: tuple | None = None) -> bool:
        if self._pending is not None:
            return False
        self._stop_measuring()  # the new edit brings its own report
        from LiverTumorDARNLib.errors import InputError

        from . import scene

        if volume_node is None or segmentation_node is None:
            raise InputError('select the CT volume and the segmentation that "Segment tumors" wrote')

        ct = self._kept(("ct", volume_node), scene.volume_state(volume_node), lambda: scene.image_from_volume(volume_node))
        labels = self._kept(("labels", segmentation_node), scene.segments_state(segmentation_node, volume_node),
                            lambda: scene.labels_from_segments(segmentation_node, volume_node))
        future = self._thread.submit(lambda: edit(self._refiner_on_thread(), ct, labels))
        self._pending = (future, volume_node, segmentation_node, ct, made_by)
        return True

    def _stop_measuring(self) -> None:
        """Forget the report being measured (a later edit or an undo makes it stale)."""
        if self._measuring is not None:
            self._measuring[0].cancel()
            self._measuring = None

    def _refiner_on_thread(self) -> Refiner:
        if self._refiner is None:
            self._refiner = self._load_refiner()
        return self._refiner

    def _kept(self, key: tuple, state: tuple, read: Callable):
        """What ``read`` returns, read again only when the scene's ``state`` differs from when it
        was last read, so that a click does not copy the CT and merge the segments again when the
        previous click left them as they were."""
        kept = self._read.get(key)
        if kept is None or kept[0] != state:
            kept = self._read[key] = (state, read())
        return kept[1]

    def _unedited_labels(self, volume_node, segmentation_node) -> np.ndarray | None:
        """The labels the running edit read, while the segments still hold them; None after an
        edit made in the Segment Editor meanwhile."""
        from . import scene

        state, labels = self._read[("labels", segmentation_node)]
        return labels if scene.segments_state(segmentation_node, volume_node) == state else None

    def _earlier_clicks(self, segmentation_node) -> list:
        """The clicks among the edits that made the segments' present state (undone ones are forgotten)."""
        if segmentation_node is None:
            return []
        return [made for made in self._edits.get(self._key(segmentation_node), []) if made is not None]

    @staticmethod
    def _key(segmentation_node):
        return segmentation_node.GetSegmentation()

    def _history(self, segmentation_node):
        import slicer

        segmentation = self._key(segmentation_node)
        if segmentation not in self._histories:
            self._histories[segmentation] = slicer.vtkSegmentationHistory()
            self._histories[segmentation].SetSegmentation(segmentation)
        return self._histories[segmentation]

    @staticmethod
    def _edit(message: str, report: CaseReport, table_node) -> Edit:
        from . import scene

        if table_node is not None:
            scene.write_results_table(table_node, report)
        return Edit(message, report)


# --------------------------------------------------------------------------------------------
# The module's work on a scene


class ModuleTasks:
    """What the module does to a scene, for the panel and the Python console alike (the module's
    Logic is one of these): load the phantom, "Segment tumors" (started, or run to the end), clicks,
    "Refine all" and undo.

    ``ensure_packages`` and ``ensure_torch`` install what first use needs (in Slicer, after asking)
    and run before anything imports it; ``python`` and ``environment`` give the worker's Python
    command and environment when a segmentation starts.
    """

    def __init__(self, mrml_scene, ensure_packages: Callable[[], None] = _ignore, ensure_torch: Callable[[], None] = _ignore,
                 python: Callable[[], Sequence[str]] = lambda: (sys.executable,),
                 environment: Callable[[], Mapping[str, str] | None] = lambda: None):
        self.mrml_scene = mrml_scene
        self._ensure_packages, self._ensure_torch = ensure_packages, ensure_torch
        self._python, self._environment = python, environment
        self._clicks: ClickSession | None = None
        self._clicks_key = None

    @staticmethod
    def models_dir(source: str, custom_dir: Path | str = "") -> Path:
        """The weights folder of a model choice ("bundled" or "custom"), its files checked."""
        from LiverTumorDARNLib.weights import chosen_models_dir

        return chosen_models_dir(source, custom_dir)

    @staticmethod
    def bundled_models_name() -> str:
        """What the bundled weights are, in a few words ("DARN Spa+Sem")."""
        from LiverTumorDARNLib.weights import bundled_models_dir, describe_models

        return describe_models(bundled_models_dir())

    def load_phantom(self, seed: int, small: bool = False):
        """The phantom case of ``seed`` added to the scene with its true segments; returns (volume
        node, segmentation node). Nothing is downloaded: the phantom is drawn from its seed."""
        self._ensure_packages()
        from . import scene

        return scene.add_phantom_case(self.mrml_scene, seed, small)

    def new_segmentation(self, volume_node):
        """An empty segmentation named after the volume, for the module's segments."""
        if volume_node is None:
            raise ValueError("Select a CT volume first.")
        segmentation_node = self.mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                              f"{volume_node.GetName()} liver and tumors")
        segmentation_node.CreateDefaultDisplayNodes()
        return segmentation_node

    def new_results_table(self):
        return self.mrml_scene.AddNewNodeByClass("vtkMRMLTableNode", "Liver tumors")

    def start_segmentation(self, volume_node, segmentation_node, table_node=None,
                           options: SegmentationOptions = SegmentationOptions(),
                           on_progress: Callable[[str, float], None] = _ignore,
                           on_message: Callable[[str], None] = _ignore) -> SegmentationJob:
        """Start "Segment tumors" in a worker process; poll the returned job."""
        if volume_node is None:
            raise ValueError("Select a CT volume first.")
        self._ensure_torch()
        self._ensure_packages()
        return SegmentationJob(volume_node, segmentation_node, table_node, options, self._python(),
                               self._environment(), on_progress, on_message)

    def segment(self, volume_node, segmentation_node=None, table_node=None,
                options: SegmentationOptions = SegmentationOptions()):
        """Segment the liver and tumors of ``volume_node`` and wait for it; returns (segmentation
        node, report). Without a segmentation node a new one is made."""
        segmentation_node = segmentation_node or self.new_segmentation(volume_node)
        return segmentation_node, self.start_segmentation(volume_node, segmentation_node, table_node, options).wait()

    def click_session(self, device: str = "auto", models_dir: Path | None = None) -> ClickSession:
        """The click session of this device and weights folder (a new one when they change)."""
        if self._clicks is None or self._clicks_key != (device, models_dir):
            self._ensure_torch()
            self._ensure_packages()
            from LiverTumorDARNLib import Refiner

            self.close_click_session()
            self._clicks = ClickSession(lambda: Refiner.load(models_dir, device))
            self._clicks_key = (device, models_dir)
        return self._clicks

    def click(self, volume_node, segmentation_node, point_ras, positive: bool = True, table_node=None,
              device: str = "auto", models_dir: Path | None = None) -> Edit:
        """One click at a world RAS point, waited for (see ``ClickSession.click``)."""
        session = self.click_session(device, models_dir)
        if not session.click(volume_node, segmentation_node, point_ras, positive):
            raise RuntimeError("The previous click is still running.")
        return session.wait(table_node)

    def refine_all(self, volume_node, segmentation_node, table_node=None, device: str = "auto",
                   models_dir: Path | None = None) -> Edit:
        """Every tumor refined, waited for."""
        session = self.click_session(device, models_dir)
        if not session.refine_all(volume_node, segmentation_node):
            raise RuntimeError("The previous click is still running.")
        return session.wait(table_node)

    def poll_clicks(self, table_node=None) -> Edit | None:
        """The click session's finished edit or report, written (see ``ClickSession.poll``)."""
        return self._clicks.poll(table_node) if self._clicks else None

    @property
    def clicks_busy(self) -> bool:
        return bool(self._clicks and self._clicks.busy)

    def undo(self, volume_node, segmentation_node, table_node=None) -> Edit | None:
        """Take back the last refinement of the segmentation; None when there is none."""
        return self._clicks.undo(volume_node, segmentation_node, table_node) if self._clicks else None

    def close_click_session(self) -> None:
        """End the click session (a closed scene, a closed module); its undo history goes with it."""
        if self._clicks is not None:
            self._clicks.close()
        self._clicks = self._clicks_key = None
