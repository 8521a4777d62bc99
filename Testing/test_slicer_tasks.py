"""The panel's work (LiverTumorDARNSceneLib.tasks) as the widget drives it: a segmentation job on a
worker process, polled, failing or cancelled, and a click session with its undo.

The worker here is a small stand-in script, so each test runs in a fraction of a second and can
make the worker fail in the ways a real one does; Testing/test_slicer_logic.py runs the real
worker. What is not tested here: Windows, where Cancel ends the tree with ``taskkill /T`` instead
of a process-group signal.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk
import torch

slicer = pytest.importorskip("slicer", reason="needs the slicer-core package (pip install -e .[test])")

from LiverTumorDARNLib.errors import InputError  # noqa: E402
from LiverTumorDARNLib.labels import LIVER, TUMOR  # noqa: E402
from LiverTumorDARNLib.phantom import generate_case  # noqa: E402
from LiverTumorDARNLib.refine import Change, Refiner  # noqa: E402
from LiverTumorDARNSceneLib import scene, tasks  # noqa: E402
from test_refine import Bright, scan, shrunk  # noqa: E402

CPU = torch.device("cpu")
WAIT_SECONDS = 60.0
"""The longest a test waits for a process to start or to go (a bound, not a measurement)."""

WORKER_WRITES_A_LIVER = """
    import json, sys
    import SimpleITK as sitk
    ct_path, labels_path = sys.argv[sys.argv.index("-m") + 2:sys.argv.index("-m") + 4]
    import numpy as np
    ct = sitk.ReadImage(ct_path)
    voxels = np.zeros(sitk.GetArrayViewFromImage(ct).shape, np.uint8)
    voxels[2:8, 10:30, 10:30] = 1  # a liver of 20 x 20 x 6 voxels
    labels = sitk.GetImageFromArray(voxels)
    labels.CopyInformation(ct)
    print(json.dumps({"stage": "liver", "fraction": 0.5}), flush=True)
    print("a warning from a library", flush=True)
    print(json.dumps({"message": "The GPU ran out of memory; segmenting on the CPU instead (slower)."}), flush=True)
    sitk.WriteImage(labels, labels_path)
    print(json.dumps({"stage": "done", "fraction": 1.0}), flush=True)
"""
WORKER_ERRS_THEN_EXITS_LATE = """
    import json, sys, time
    print(json.dumps({"error": "CT: no air in the image; is it an MR?"}), flush=True)
    time.sleep(0.5)
    sys.exit(2)
"""
WORKER_CRASHES = """
    import sys
    print("Traceback (most recent call last):", flush=True)
    print("RuntimeError: the network's file is damaged", flush=True)
    sys.exit(1)
"""
LAUNCHER_OF_A_CHILD = """
    import subprocess, sys
    # PythonSlicer's way: a launcher that runs the real interpreter as its child and waits for it
    child = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(600)"
    sys.exit(subprocess.call([sys.executable, "-c", child, sys.argv[1]]))
"""


def script(folder: Path, name: str, code: str) -> Path:
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(code))
    return path


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(") ", 1)[-1].startswith("Z"))


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def mrml_scene():
    scene.register_segmentation_converters()
    return slicer.vtkMRMLScene()


@pytest.fixture
def phantom(mrml_scene):
    """A small phantom volume and an empty segmentation for the module's segments."""
    volume = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT 7")
    scene.set_volume_from_image(volume, generate_case(7, small=True).image)
    return volume, mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Result")


def start(phantom, worker: Path, *arguments, **callbacks) -> tasks.SegmentationJob:
    """A segmentation job whose "Python" runs ``worker`` (which gets the real worker's arguments)."""
    volume, segmentation = phantom
    return tasks.SegmentationJob(volume, segmentation, python=(sys.executable, str(worker), *arguments), **callbacks)


# ------------------------------------------------------------------------------ segmentation job


def test_a_finished_job_writes_the_workers_label_map_and_passes_on_its_stages_and_messages(phantom, tmp_path):
    stages, messages = [], []
    job = start(phantom, script(tmp_path, "worker", WORKER_WRITES_A_LIVER),
                on_progress=lambda stage, fraction: stages.append((stage, fraction)), on_message=messages.append)
    report = job.wait()
    volume, segmentation = phantom
    assert stages == [("liver", 0.5), ("done", 1.0)]
    assert messages == job.messages == ["The GPU ran out of memory; segmenting on the CPU instead (slower)."]
    assert (scene.labels_from_segments(segmentation, volume) == LIVER).sum() == 20 * 20 * 6
    assert report.liver_volume_ml > 0 and not job.work_folder.exists()


def test_an_error_the_worker_reports_long_before_it_exits_is_the_error_shown(phantom, tmp_path):
    job = start(phantom, script(tmp_path, "worker", WORKER_ERRS_THEN_EXITS_LATE))
    with pytest.raises(InputError, match=r"^CT: no air in the image; is it an MR\?$"):
        job.wait()
    volume, segmentation = phantom
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 0
    assert job.finished and not job.work_folder.exists()


def test_a_worker_that_dies_without_an_error_record_is_reported_with_its_status_and_last_line(phantom, tmp_path):
    job = start(phantom, script(tmp_path, "worker", WORKER_CRASHES))
    with pytest.raises(RuntimeError, match="stopped with status 1: RuntimeError: the network's file is damaged"):
        job.wait()


@pytest.mark.skipif(os.name == "nt", reason="Windows ends the tree with taskkill /T, which this test does not reach")
def test_cancel_ends_the_worker_and_the_process_it_started(phantom, tmp_path):
    pid_file = tmp_path / "child.pid"
    job = start(phantom, script(tmp_path, "launcher", LAUNCHER_OF_A_CHILD), str(pid_file))
    wait_until(lambda: pid_file.exists() and pid_file.read_text(), "the launcher's child")
    child = int(pid_file.read_text())

    job.cancel()

    assert job.poll() and job.cancelled
    assert not alive(job.worker_pid)
    wait_until(lambda: not alive(child), f"the child {child} to end")
    assert not job.work_folder.exists()
    assert phantom[1].GetSegmentation().GetNumberOfSegments() == 0


def test_a_poll_from_inside_a_message_dialog_finishes_the_job_once(phantom, tmp_path, monkeypatch):
    """A modal dialog runs the panel's timer, so the job is polled from inside its own callback."""
    writes = []
    write_segments = scene.write_segments
    monkeypatch.setattr(scene, "write_segments", lambda *args: writes.append(write_segments(*args)))
    job = None

    def dialog(text: str) -> None:
        wait_until(job.poll, "the nested polls to finish the job")

    job = start(phantom, script(tmp_path, "worker", WORKER_WRITES_A_LIVER), on_message=dialog)
    assert job.wait() is not None
    assert len(writes) == 1


def test_keeping_uncertain_tumors_runs_the_worker_without_a_floor_on_the_chosen_weights(tmp_path):
    options = tasks.SegmentationOptions(tmp_path / "weights", "cpu", keep_uncertain_tumors=True)
    command = tasks.worker_command(["PythonSlicer"], tmp_path / "ct.nrrd", tmp_path / "labels.nrrd", options, "CT 7")
    assert command == ["PythonSlicer", "-m", "LiverTumorDARNSceneLib.worker", str(tmp_path / "ct.nrrd"),
                       str(tmp_path / "labels.nrrd"), "--device", "cpu", "--name", "CT 7",
                       "--models", str(tmp_path / "weights"), "--min-tumor-confidence", "0"]


def test_the_worker_finds_the_modules_packages_first_on_its_path():
    environment = tasks.worker_environment({"PYTHONPATH": "/elsewhere"})
    assert environment["PYTHONPATH"].split(os.pathsep) == [str(tasks.MODULE_DIR), "/elsewhere"]


def test_the_panel_loads_the_phantom_before_the_packages_first_use_installs_are_there():
    """Slicer without connected-components-3d yet: the module's imports must not need it, and the
    phantom is drawn once the install (here: unblocking the import) has run."""
    code = textwrap.dedent("""
        import sys
        sys.modules["cc3d"] = None  # not installed yet: importing it fails
        import slicer
        from LiverTumorDARNSceneLib import dependencies, scene, tasks

        def install():
            del sys.modules["cc3d"]
            print("installed")

        scene.register_segmentation_converters()
        volume, truth = tasks.ModuleTasks(slicer.vtkMRMLScene(), ensure_packages=install).load_phantom(3, small=True)
        print(volume.GetName(), truth.GetSegmentation().GetNumberOfSegments())
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tasks.MODULE_DIR)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["installed", "LiverPhantom3", "2"]


# ------------------------------------------------------------------------------ click session


@pytest.fixture
def two_tumors(mrml_scene, tmp_path):
    """Two bright tumors, shrunk in the segments (one segment per tumor)."""
    ct, truth = scan([((14, 14, 6), 5.0), ((36, 36, 14), 5.0)])
    volume = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    scene.set_volume_from_image(volume, ct)
    segmentation = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Result")
    scene.write_segments(segmentation, volume, shrunk(truth), per_tumor=True)
    return ct, truth, volume, segmentation


def ras(volume, ijk) -> list[float]:
    return list((scene.world_ijk_to_ras(volume) @ [*ijk, 1.0])[:3])


def segment_names(segmentation) -> list[str]:
    return [segmentation.GetSegmentation().GetSegment(i).GetName() for i in segmentation.GetSegmentation().GetSegmentIDs()]


def test_undo_takes_back_a_click_and_the_segment_of_the_lesion_it_added(two_tumors):
    ct, truth, volume, segmentation = two_tumors
    missed = shrunk(truth)
    missed[:, 25:, 25:] = np.minimum(missed[:, 25:, 25:], LIVER)
    scene.write_segments(segmentation, volume, missed, per_tumor=True)
    session = tasks.ClickSession(lambda: Refiner(Bright(), CPU))
    names, labels = segment_names(segmentation), scene.labels_from_segments(segmentation, volume)

    assert session.click(volume, segmentation, ras(volume, (36, 36, 14)))
    assert session.wait().message == "lesion added"
    assert segment_names(segmentation) == names + ["Liver tumor 2"]
    undone = session.undo(volume, segmentation)

    assert undone.message == "last refinement undone"
    assert segment_names(segmentation) == names
    np.testing.assert_array_equal(scene.labels_from_segments(segmentation, volume), labels)


def test_undo_takes_back_edits_one_at_a_time_and_then_has_nothing_left(two_tumors):
    _ct, _truth, volume, segmentation = two_tumors
    session = tasks.ClickSession(lambda: Refiner(Bright(), CPU))
    states = [scene.labels_from_segments(segmentation, volume)]
    for ijk in ((14, 14, 6), (36, 36, 14)):
        session.click(volume, segmentation, ras(volume, ijk))
        session.wait()
        states.append(scene.labels_from_segments(segmentation, volume))
    assert not np.array_equal(states[0], states[1]) and not np.array_equal(states[1], states[2])

    for state in (states[1], states[0]):
        assert session.undo(volume, segmentation) is not None
        np.testing.assert_array_equal(scene.labels_from_segments(segmentation, volume), state)
    assert session.undo(volume, segmentation) is None


class Waiting:
    """A refiner whose click waits until the test lets it go."""

    def __init__(self):
        import threading

        self.go = threading.Event()

    def click(self, ct, labels, point, positive, earlier):
        self.go.wait(WAIT_SECONDS)
        return Change(labels, None, "tumor refined (no change)")


def test_a_click_while_the_previous_one_runs_is_refused_and_the_first_one_still_lands(two_tumors):
    _ct, _truth, volume, segmentation = two_tumors
    refiner = Waiting()
    session = tasks.ClickSession(lambda: refiner)
    assert session.click(volume, segmentation, ras(volume, (14, 14, 6)))
    assert not session.click(volume, segmentation, ras(volume, (36, 36, 14)))
    assert session.busy and session.poll() is None
    refiner.go.set()
    assert session.wait().message == "tumor refined (no change)"
    assert not session.busy


class HeldReports:
    """``scene.measure`` held until the test lets it go: what a click shows before its report."""

    def __init__(self, monkeypatch):
        import threading

        self.go, self.measured = threading.Event(), []
        measure = scene.measure

        def held(ct, labels):
            self.go.wait(WAIT_SECONDS)
            self.measured.append(labels)
            return measure(ct, labels)

        monkeypatch.setattr(scene, "measure", held)


def poll_until_written(session) -> tasks.Edit:
    deadline = time.monotonic() + WAIT_SECONDS
    while (edit := session.poll()) is None:
        assert time.monotonic() < deadline, "gave up waiting for the click"
        time.sleep(0.01)
    return edit


def test_a_click_is_written_into_the_segments_before_its_report_is_measured(two_tumors, monkeypatch):
    _ct, _truth, volume, segmentation = two_tumors
    held = HeldReports(monkeypatch)
    table = volume.GetScene().AddNewNodeByClass("vtkMRMLTableNode", "Liver tumors")
    session = tasks.ClickSession(lambda: Refiner(Bright(), CPU))
    before = scene.labels_from_segments(segmentation, volume)
    session.click(volume, segmentation, ras(volume, (36, 36, 14)))

    edit = poll_until_written(session)
    assert edit.report is None and session.busy and table.GetNumberOfRows() == 0
    assert not np.array_equal(scene.labels_from_segments(segmentation, volume), before)
    held.go.set()
    assert session.wait(table).message == edit.message and table.GetNumberOfRows() == 2
    assert not session.busy


def test_a_click_while_the_previous_report_is_measured_is_taken_and_brings_its_own_report(two_tumors, monkeypatch):
    _ct, _truth, volume, segmentation = two_tumors
    held = HeldReports(monkeypatch)
    session = tasks.ClickSession(lambda: Refiner(Bright(), CPU))
    session.click(volume, segmentation, ras(volume, (14, 14, 6)))
    poll_until_written(session)

    assert session.click(volume, segmentation, ras(volume, (36, 36, 14)))
    held.go.set()
    report = session.wait().report
    np.testing.assert_array_equal(held.measured[-1], scene.labels_from_segments(segmentation, volume))
    assert report == scene.measure_segments(segmentation, volume)


def test_a_refused_click_leaves_the_segments_and_the_undo_history_as_they_were(two_tumors):
    _ct, _truth, volume, segmentation = two_tumors
    session = tasks.ClickSession(lambda: Refiner(Bright(), CPU))
    before = scene.labels_from_segments(segmentation, volume)
    session.click(volume, segmentation, ras(volume, (14, 14, 400)))
    with pytest.raises(InputError, match="is outside the volume"):
        session.wait()
    np.testing.assert_array_equal(scene.labels_from_segments(segmentation, volume), before)
    assert session.undo(volume, segmentation) is None


class Remembering(Refiner):
    """The Bright refiner, keeping the earlier clicks each click was given."""

    def __init__(self):
        super().__init__(Bright(), CPU)
        self.given: list[list] = []

    def click(self, ct, labels, point_ijk, positive=True, earlier=()):
        self.given.append([(tuple(ijk), sign) for ijk, sign in earlier])
        return super().click(ct, labels, point_ijk, positive, earlier)


def test_each_click_is_given_the_earlier_clicks_that_were_not_undone(two_tumors):
    _ct, _truth, volume, segmentation = two_tumors
    refiner = Remembering()
    session = tasks.ClickSession(lambda: refiner)
    for ijk, positive, undo in (((14, 14, 6), True, False), ((36, 36, 14), False, True), ((36, 36, 14), True, False)):
        session.click(volume, segmentation, ras(volume, ijk), positive)
        session.wait()
        if undo:
            session.undo(volume, segmentation)
    assert refiner.given == [[], [((14, 14, 6), True)], [((14, 14, 6), True)]]


class Seeing(Refiner):
    """The Bright refiner, keeping the label map each click was given."""

    def __init__(self):
        super().__init__(Bright(), CPU)
        self.seen: list[np.ndarray] = []

    def click(self, ct, labels, point_ijk, positive=True, earlier=()):
        self.seen.append(labels.copy())
        return super().click(ct, labels, point_ijk, positive, earlier)


def test_a_click_sees_an_edit_made_to_the_segments_since_the_previous_click(two_tumors):
    _ct, _truth, volume, segmentation = two_tumors
    refiner = Seeing()
    session = tasks.ClickSession(lambda: refiner)
    session.click(volume, segmentation, ras(volume, (14, 14, 6)))
    session.wait()
    edited = scene.labels_from_segments(segmentation, volume)
    edited[:, 25:, 25:] = np.minimum(edited[:, 25:, 25:], LIVER)  # the second tumor erased, as the Segment Editor would
    scene.apply_change(segmentation, volume, edited, (slice(0, edited.shape[0]), slice(25, 48), slice(25, 48)))
    session.click(volume, segmentation, ras(volume, (14, 14, 6)))
    session.wait()
    np.testing.assert_array_equal(refiner.seen[1], edited)


def test_a_click_after_an_undo_sees_the_segments_as_undone(two_tumors):
    _ct, _truth, volume, segmentation = two_tumors
    refiner = Seeing()
    session = tasks.ClickSession(lambda: refiner)
    for ijk in ((14, 14, 6), (36, 36, 14)):
        session.click(volume, segmentation, ras(volume, ijk))
        session.wait()
    session.undo(volume, segmentation)
    session.click(volume, segmentation, ras(volume, (36, 36, 14)))
    session.wait()
    np.testing.assert_array_equal(refiner.seen[2], refiner.seen[1])


def test_a_click_on_a_volume_the_segments_were_not_made_on_is_refused_before_any_change(two_tumors, mrml_scene):
    ct, _truth, volume, segmentation = two_tumors
    other = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Other CT")
    resampled = sitk.Image(ct)
    resampled.SetSpacing([2 * s for s in ct.GetSpacing()])  # the same voxels on a coarser grid
    scene.set_volume_from_image(other, resampled)
    before = scene.labels_from_segments(segmentation, volume)
    session = tasks.ClickSession(lambda: Refiner(Bright(), CPU))
    with pytest.raises(InputError, match="made on another grid"):
        session.click(other, segmentation, ras(other, (14, 14, 6)))
    assert not session.busy and session.undo(volume, segmentation) is None
    np.testing.assert_array_equal(scene.labels_from_segments(segmentation, volume), before)


def test_a_click_session_writes_the_results_table(two_tumors):
    _ct, _truth, volume, segmentation = two_tumors
    table = volume.GetScene().AddNewNodeByClass("vtkMRMLTableNode", "Liver tumors")
    session = tasks.ClickSession(lambda: Refiner(Bright(), CPU))
    session.refine_all(volume, segmentation)
    edit = session.wait(table)
    assert table.GetNumberOfRows() == len(edit.report.tumors) == 2


def test_a_click_without_a_segmentation_asks_for_one(two_tumors):
    _ct, _truth, volume, _segmentation = two_tumors
    with pytest.raises(InputError, match="select the CT volume and the segmentation"):
        tasks.ClickSession(lambda: Refiner(Bright(), CPU)).click(volume, None, ras(volume, (14, 14, 6)))


class EditedMeanwhile(Refiner):
    """The Bright refiner, whose click lets the test edit the segments while it runs."""

    def __init__(self, edit: Callable[[], None]):
        super().__init__(Bright(), CPU)
        self.edit = edit

    def click(self, ct, labels, point_ijk, positive=True, earlier=()):
        change = super().click(ct, labels, point_ijk, positive, earlier)
        self.edit()
        return change


def test_a_click_written_after_an_edit_made_while_it_ran_sets_its_box_as_the_click_found_it(two_tumors):
    """The session spares the merges that change nothing in the labels it read; after an edit
    made meanwhile in the Segment Editor (tumor painted on liver inside the click's box and
    outside it) the click still sets its box whole, and the edit outside the box stays."""
    ct, truth, volume, segmentation = two_tumors
    expected = Refiner(Bright(), CPU).click(ct, shrunk(truth), (14, 14, 6))
    liver_in_box = np.argwhere(expected.labels[expected.box] == LIVER)[0] + [b.start for b in expected.box]
    inside, outside = tuple(int(v) for v in liver_in_box), (1, 40, 1)
    painted = shrunk(truth)
    painted[inside] = painted[outside] = TUMOR
    whole = tuple(slice(0, n) for n in painted.shape)
    refiner = EditedMeanwhile(lambda: scene.apply_change(segmentation, volume, painted, whole))
    session = tasks.ClickSession(lambda: refiner)

    session.click(volume, segmentation, ras(volume, (14, 14, 6)))
    session.wait()

    after = scene.labels_from_segments(segmentation, volume)
    np.testing.assert_array_equal(after[expected.box], expected.labels[expected.box])
    assert after[outside] == TUMOR
