"""The Slicer module's scene logic and the panel's work (the segmentation job with a real worker
process, the click session) against Slicer's real MRML classes (PyPI ``slicer-core``).

Volumes are loaded with Slicer's own reader (vtkMRMLVolumeArchetypeStorageNode), so the geometry
the logic sees is the one the application would give it; when a test puts the volume under a
parent transform, it moves the volume's own matrix the other way, so its world geometry stays the
file's and the command line's result on the file is the expected answer, voxel for voxel.
"""

from __future__ import annotations

import cc3d
import numpy as np
import pytest
import SimpleITK as sitk
import torch

slicer = pytest.importorskip("slicer", reason="needs the slicer-core package (pip install -e .[test])")
import vtk  # noqa: E402  (slicer-core brings vtk)

from LiverTumorDARNLib.cli import main  # noqa: E402
from LiverTumorDARNLib.errors import InputError  # noqa: E402
from LiverTumorDARNLib.labels import LIVER, TUMOR  # noqa: E402
from LiverTumorDARNLib.phantom import generate_case  # noqa: E402
from LiverTumorDARNLib.refine import Refiner  # noqa: E402
from LiverTumorDARNSceneLib import scene as logic  # noqa: E402
from LiverTumorDARNSceneLib.tasks import ClickSession, ModuleTasks, SegmentationOptions  # noqa: E402
from test_refine import Bright, dice, scan, shrunk  # noqa: E402

CPU = torch.device("cpu")
FLIPPED = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
# Right-handed, as Slicer's reader keeps them (it reorders the slices of a left-handed file).
OBLIQUE = tuple(np.array([[-0.8, 0.6, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, -1.0]]).ravel())
ORIGIN = (30.5, -12.25, 400.0)
LIVER_TERMINOLOGY = ("Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure"
                     "~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^")
TUMOR_TERMINOLOGY = ("Segmentation category and type - DICOM master list~SCT^49755003^Morphologically Altered Structure"
                     "~SCT^108369006^Neoplasm~^^~Anatomic codes - DICOM master list~SCT^10200004^Liver~^^")


def rotation_and_shift() -> np.ndarray:
    """A rigid parent transform: 30 degrees about S, then 10, -20, 5 mm."""
    angle = np.radians(30)
    matrix = np.eye(4)
    matrix[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    matrix[:3, 3] = (10.0, -20.0, 5.0)
    return matrix


def vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, array[row, column])
    return matrix


def load_volume(scene, path, parent: np.ndarray | None = None, node_class="vtkMRMLScalarVolumeNode"):
    """Read ``path`` with Slicer's reader; with ``parent``, put it under that transform while
    keeping its world geometry the file's."""
    node = scene.AddNewNodeByClass(node_class, "CT")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    if parent is not None:
        local = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(local)
        file_matrix = np.array([[local.GetElement(r, c) for c in range(4)] for r in range(4)])
        node.SetIJKToRASMatrix(vtk_matrix(np.linalg.inv(parent) @ file_matrix))
        transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "Parent")
        transform.SetMatrixTransformToParent(vtk_matrix(parent))
        node.SetAndObserveTransformNodeID(transform.GetID())
    return node


def segment_labels(segmentation_node, volume_node, segment_ids) -> np.ndarray:
    """Segments exported by Slicer itself onto the volume's grid: segment n becomes label n + 1."""
    labelmap = volume_node.GetScene().AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        segmentation_node, list(segment_ids), labelmap, volume_node, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    return slicer.util.arrayFromVolume(labelmap).copy()


def segment_masks(segmentation_node, volume_node, segment_ids) -> list[np.ndarray]:
    """Each segment exported alone: its voxels on the volume's grid."""
    return [segment_labels(segmentation_node, volume_node, [segment_id]) > 0 for segment_id in segment_ids]


def segment_names(segmentation_node) -> list[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetSegment(i).GetName() for i in segmentation.GetSegmentIDs()]


def ijk_to_ras(image: sitk.Image, ijk) -> tuple[float, float, float]:
    x, y, z = image.TransformIndexToPhysicalPoint(tuple(int(v) for v in ijk))
    return -x, -y, z


@pytest.fixture
def mrml_scene():
    logic.register_segmentation_converters()
    return slicer.vtkMRMLScene()


def segment_in_worker(volume, segmentation, models_dir, per_tumor=False):
    """"Segment tumors" as the panel runs it: a worker process, its label map written by the job."""
    options = SegmentationOptions(models_dir, "cpu", per_tumor)
    return ModuleTasks(volume.GetScene()).segment(volume, segmentation, options=options)[1]


def clicks(refiner=None) -> ClickSession:
    """The panel's click session, with the bright-tumor test network (see test_refine)."""
    return ClickSession(lambda: refiner or Refiner(Bright(), CPU))


def click(volume, segmentation, point_ras, positive=True) -> str:
    """One click through the panel's click session, waited for; what it did."""
    session = clicks()
    assert session.click(volume, segmentation, point_ras, positive)
    return session.wait().message


def refine_all(volume, segmentation) -> str:
    """"Refine all tumors" through the panel's click session, waited for; what it did."""
    session = clicks()
    assert session.refine_all(volume, segmentation)
    return session.wait().message


@pytest.fixture(scope="module")
def phantom_file(tmp_path_factory):
    """A small phantom with flipped i and k axes and a non-zero origin."""
    image = generate_case(3, small=True).image
    image.SetDirection(FLIPPED)
    image.SetOrigin(ORIGIN)
    path = tmp_path_factory.mktemp("phantom") / "ct.nrrd"
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def command_line_labels(phantom_file, models_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("cli") / "labels.nrrd"
    assert main(["segment", str(phantom_file), "-o", str(output), "--models", str(models_dir), "--device", "cpu"]) == 0
    return sitk.GetArrayFromImage(sitk.ReadImage(str(output)))


def segmented_phantom(phantom_file, models_dir, per_tumor: bool):
    """The phantom under a rotating parent transform in a scene of its own, segmented by the
    panel's segmentation job (a real worker process)."""
    logic.register_segmentation_converters()
    mrml_scene = slicer.vtkMRMLScene()
    volume = load_volume(mrml_scene, phantom_file, parent=rotation_and_shift())
    segmentation = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Result")
    segment_in_worker(volume, segmentation, models_dir, per_tumor)
    return mrml_scene, volume, segmentation


@pytest.fixture(scope="module")
def segmented(phantom_file, models_dir):
    """The segmented phantom, for tests that only read it."""
    mrml_scene, volume, segmentation = segmented_phantom(phantom_file, models_dir, per_tumor=False)
    yield volume, segmentation  # the scene lives as long as the fixture: its nodes need it


@pytest.fixture(scope="module")
def segmented_per_tumor(phantom_file, models_dir):
    """As ``segmented``, with one segment per tumor."""
    mrml_scene, volume, segmentation = segmented_phantom(phantom_file, models_dir, per_tumor=True)
    yield volume, segmentation


@pytest.fixture
def earlier_result(mrml_scene, phantom_file, command_line_labels):
    """The phantom with this module's segments of an earlier run (the command line's labels)."""
    volume = load_volume(mrml_scene, phantom_file, parent=rotation_and_shift())
    segmentation = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Result")
    logic.write_segments(segmentation, volume, command_line_labels)
    return volume, segmentation


# ------------------------------------------------------------------------------ geometry


def test_a_volume_becomes_the_image_its_file_holds_flips_oblique_axes_and_origin(mrml_scene, tmp_path):
    image = generate_case(2, small=True).image
    image.SetDirection(OBLIQUE)
    image.SetOrigin(ORIGIN)
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    converted = logic.image_from_volume(load_volume(mrml_scene, tmp_path / "ct.nrrd"))
    np.testing.assert_allclose(converted.GetDirection(), OBLIQUE, atol=1e-9)
    np.testing.assert_allclose(converted.GetSpacing(), image.GetSpacing(), rtol=1e-9)
    np.testing.assert_allclose(converted.GetOrigin(), ORIGIN, atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(converted), sitk.GetArrayFromImage(image))


def test_a_phantom_case_becomes_a_volume_of_its_image_with_its_true_segments_voxel_for_voxel(mrml_scene):
    case = generate_case(5, small=True)
    volume, segmentation = logic.add_phantom_case(mrml_scene, 5, small=True)
    converted = logic.image_from_volume(volume)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(converted), sitk.GetArrayFromImage(case.image))
    np.testing.assert_allclose(converted.GetDirection(), case.image.GetDirection(), atol=1e-9)
    np.testing.assert_allclose(converted.GetSpacing(), case.image.GetSpacing(), rtol=1e-9)
    np.testing.assert_allclose(converted.GetOrigin(), case.image.GetOrigin(), atol=1e-9)
    np.testing.assert_array_equal(logic.labels_from_segments(segmentation, volume), sitk.GetArrayFromImage(case.labels))


def test_a_parent_transform_is_hardened_into_the_image_geometry(mrml_scene, phantom_file):
    volume = load_volume(mrml_scene, phantom_file, parent=rotation_and_shift())
    converted = logic.image_from_volume(volume)
    np.testing.assert_allclose(converted.GetDirection(), FLIPPED, atol=1e-9)
    np.testing.assert_allclose(converted.GetOrigin(), ORIGIN, atol=1e-9)


def test_a_non_linear_parent_transform_is_refused_with_a_message(mrml_scene, phantom_file):
    volume = load_volume(mrml_scene, phantom_file)
    warp = mrml_scene.AddNewNodeByClass("vtkMRMLTransformNode", "Warp")
    warp.SetAndObserveTransformToParent(vtk.vtkSphericalTransform())
    volume.SetAndObserveTransformNodeID(warp.GetID())
    with pytest.raises(InputError, match="transform 'Warp' is not linear; harden it"):
        logic.image_from_volume(volume)


def test_a_ras_point_maps_to_the_voxel_that_contains_it_through_the_parent_transform(mrml_scene, phantom_file):
    volume = load_volume(mrml_scene, phantom_file, parent=rotation_and_shift())
    image = sitk.ReadImage(str(phantom_file))
    assert logic.ras_to_ijk(volume, ijk_to_ras(image, (12, 40, 7))) == (12, 40, 7)


# ------------------------------------------------------------------------------ segments


@pytest.mark.slow
def test_segments_match_the_command_line_label_map_voxel_for_voxel(segmented, command_line_labels):
    volume, segmentation = segmented
    ids = logic.module_segment_ids(segmentation)
    assert {LIVER, TUMOR} <= set(np.unique(command_line_labels)), "the fixture should give both labels"
    np.testing.assert_array_equal(segment_labels(segmentation, volume, ids["liver"] + ids["tumor"]),
                                  command_line_labels)


@pytest.mark.slow
def test_segments_have_the_names_colours_and_terminology_slicer_expects(segmented):
    _volume, segmentation = segmented
    ids = logic.module_segment_ids(segmentation)
    liver = segmentation.GetSegmentation().GetSegment(ids["liver"][0])
    tumor = segmentation.GetSegmentation().GetSegment(ids["tumor"][0])
    assert (liver.GetName(), tumor.GetName()) == ("Liver", "Liver tumor")
    np.testing.assert_allclose(liver.GetColor(), (221 / 255, 130 / 255, 101 / 255))
    assert liver.GetTerminology() == LIVER_TERMINOLOGY
    assert tumor.GetTerminology() == TUMOR_TERMINOLOGY


@pytest.mark.slow
def test_the_segmentation_takes_the_volume_as_reference_geometry_and_parent_transform(segmented):
    volume, segmentation = segmented
    assert segmentation.GetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole()) == volume.GetID()
    assert segmentation.GetTransformNodeID() == volume.GetTransformNodeID()


@pytest.mark.slow
def test_a_rerun_replaces_the_module_segments_and_keeps_the_users(earlier_result, models_dir, command_line_labels):
    volume, segmentation = earlier_result
    users = np.zeros(command_line_labels.shape, np.uint8)
    users[10:20, 30:60, 30:60] = 1  # overlaps the liver
    user_id = segmentation.GetSegmentation().AddEmptySegment("", "My note", (0.0, 0.0, 1.0))
    logic._replace_segment(segmentation, user_id, users, volume)

    segment_in_worker(volume, segmentation, models_dir)

    names = [segmentation.GetSegmentation().GetSegment(i).GetName() for i in segmentation.GetSegmentation().GetSegmentIDs()]
    assert sorted(names) == ["Liver", "Liver tumor", "My note"]
    np.testing.assert_array_equal(segment_labels(segmentation, volume, [user_id]), users)
    ids = logic.module_segment_ids(segmentation)
    np.testing.assert_array_equal(segment_labels(segmentation, volume, ids["liver"] + ids["tumor"]),
                                  command_line_labels)


@pytest.mark.slow
def test_per_tumor_segments_are_the_command_lines_connected_tumors_voxel_for_voxel(segmented_per_tumor,
                                                                                   command_line_labels):
    volume, segmentation = segmented_per_tumor
    ids = logic.module_segment_ids(segmentation)
    tumors = cc3d.connected_components(command_line_labels == TUMOR, connectivity=26)
    assert tumors.max() >= 2, "the fixture should give several tumors"
    masks = segment_masks(segmentation, volume, ids["tumor"])
    covered = [np.unique(tumors[mask]) for mask in masks]
    assert all(len(numbers) == 1 and numbers[0] > 0 for numbers in covered), "each segment is one whole tumor"
    for mask, (number,) in zip(masks, covered):
        np.testing.assert_array_equal(mask, tumors == number)
    assert sorted(number for (number,) in covered) == list(range(1, tumors.max() + 1))
    np.testing.assert_array_equal(segment_masks(segmentation, volume, ids["liver"])[0], command_line_labels == LIVER)


@pytest.mark.slow
def test_per_tumor_segments_are_numbered_largest_first_with_tumor_codes_role_and_shades_of_its_colour(segmented_per_tumor):
    volume, segmentation = segmented_per_tumor
    tumor_ids = logic.module_segment_ids(segmentation)["tumor"]
    segments = [segmentation.GetSegmentation().GetSegment(i) for i in tumor_ids]
    sizes = [mask.sum() for mask in segment_masks(segmentation, volume, tumor_ids)]
    assert [s.GetName() for s in segments] == [f"Liver tumor {n}" for n in range(1, len(segments) + 1)]
    assert sizes == sorted(sizes, reverse=True)
    assert {s.GetTerminology() for s in segments} == {TUMOR_TERMINOLOGY}
    assert {logic._tag(s, logic.ROLE_TAG) for s in segments} == {"tumor"}
    np.testing.assert_allclose(segments[0].GetColor(), (144 / 255, 238 / 255, 144 / 255))
    assert len({s.GetColor() for s in segments[:2]}) == 2, "neighbouring numbers have different shades"


@pytest.mark.slow
def test_a_rerun_per_tumor_replaces_the_module_segments_and_keeps_the_users(earlier_result, models_dir,
                                                                             command_line_labels):
    volume, segmentation = earlier_result
    users = np.zeros(command_line_labels.shape, np.uint8)
    users[10:20, 30:60, 30:60] = 1
    user_id = segmentation.GetSegmentation().AddEmptySegment("", "My note", (0.0, 0.0, 1.0))
    logic._replace_segment(segmentation, user_id, users, volume)

    segment_in_worker(volume, segmentation, models_dir, per_tumor=True)

    tumor_count = cc3d.connected_components(command_line_labels == TUMOR, connectivity=26).max()
    assert sorted(segment_names(segmentation)) == sorted(
        ["Liver", "My note"] + [f"Liver tumor {n}" for n in range(1, tumor_count + 1)])
    np.testing.assert_array_equal(segment_labels(segmentation, volume, [user_id]), users)
    np.testing.assert_array_equal(logic.labels_from_segments(segmentation, volume), command_line_labels)


def test_labels_read_back_from_the_segments_are_those_written(mrml_scene, phantom_file):
    volume = load_volume(mrml_scene, phantom_file, parent=rotation_and_shift())
    labels = sitk.GetArrayFromImage(generate_case(3, small=True).labels).astype(np.uint8)
    segmentation = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    logic.write_segments(segmentation, volume, labels)
    np.testing.assert_array_equal(logic.labels_from_segments(segmentation, volume), labels)


def test_a_label_array_of_another_shape_is_refused(mrml_scene, phantom_file):
    volume = load_volume(mrml_scene, phantom_file)
    segmentation = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(InputError, match="does not fit CT"):
        logic.write_segments(segmentation, volume, np.zeros((4, 4, 4), np.uint8))


def test_refining_without_segments_of_the_module_asks_to_segment_first(mrml_scene, phantom_file):
    volume = load_volume(mrml_scene, phantom_file)
    segmentation = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Empty")
    with pytest.raises(InputError, match='run "Segment tumors" first'):
        refine_all(volume, segmentation)


# ------------------------------------------------------------------------------ clicks


@pytest.fixture
def two_tumors(mrml_scene, tmp_path):
    """Two bright tumors, shrunk in the segments, in a flipped volume under a parent transform."""
    ct, truth = scan([((14, 14, 6), 5.0), ((36, 36, 14), 5.0)], direction=FLIPPED)
    sitk.WriteImage(ct, str(tmp_path / "scan.nrrd"))
    volume = load_volume(mrml_scene, tmp_path / "scan.nrrd", parent=rotation_and_shift())
    segmentation = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Result")
    logic.write_segments(segmentation, volume, shrunk(truth))
    return ct, truth, volume, segmentation


def test_a_click_in_ras_refines_the_tumor_under_it_and_only_that_tumor(two_tumors):
    ct, truth, volume, segmentation = two_tumors
    coarse = shrunk(truth)
    message = click(volume, segmentation, ijk_to_ras(ct, (14, 14, 6)))
    after = logic.labels_from_segments(segmentation, volume)
    assert message == "tumor refined"
    first, second = np.zeros_like(truth, bool), np.zeros_like(truth, bool)
    first[:, :25, :25], second[:, 25:, 25:] = True, True
    assert dice((after == TUMOR) & first, (truth == TUMOR) & first) > dice((coarse == TUMOR) & first, (truth == TUMOR) & first) + 0.05
    np.testing.assert_array_equal(after[second], coarse[second])


def test_a_click_writes_the_refiners_labels_and_nothing_outside_its_box(two_tumors):
    ct, truth, volume, segmentation = two_tumors
    expected = Refiner(Bright(), CPU).click(ct, shrunk(truth), (36, 36, 14))
    click(volume, segmentation, ijk_to_ras(ct, (36, 36, 14)))
    assert expected.box is not None
    np.testing.assert_array_equal(logic.labels_from_segments(segmentation, volume), expected.labels)


def test_a_segmentation_moved_off_the_volumes_transform_is_refused_and_left_as_it_was(two_tumors, mrml_scene):
    ct, truth, volume, segmentation = two_tumors
    segmentation.SetAndObserveTransformNodeID(mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode").GetID())
    with pytest.raises(InputError, match="under different transforms"):
        click(volume, segmentation, ijk_to_ras(ct, (14, 14, 6)))
    segmentation.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
    np.testing.assert_array_equal(logic.labels_from_segments(segmentation, volume), shrunk(truth))


def test_a_negative_click_removes_the_tumor_under_it(two_tumors):
    ct, _truth, volume, segmentation = two_tumors
    click(volume, segmentation, ijk_to_ras(ct, (14, 14, 6)), positive=False)
    after = logic.labels_from_segments(segmentation, volume)
    assert not (after[:, :25, :25] == TUMOR).any()
    assert (after[:, 25:, 25:] == TUMOR).any()


def test_a_click_outside_the_volume_is_refused_with_the_volume_range(two_tumors):
    ct, _truth, volume, segmentation = two_tumors
    with pytest.raises(InputError, match="is outside the volume"):
        click(volume, segmentation, ijk_to_ras(ct, (14, 14, 400)))


def test_refine_all_refines_every_tumor(two_tumors):
    _ct, truth, volume, segmentation = two_tumors
    message = refine_all(volume, segmentation)
    after = logic.labels_from_segments(segmentation, volume)
    assert message == "2 tumors refined"
    assert dice(after == TUMOR, truth == TUMOR) > dice(shrunk(truth) == TUMOR, truth == TUMOR) + 0.05


# ------------------------------------------------------------------------------ clicks, one segment per tumor


FIRST_TUMOR, SECOND_TUMOR = (14, 14, 6), (36, 36, 14)


def halves(shape) -> tuple[np.ndarray, np.ndarray]:
    """The parts of the ``two_tumors`` volume that hold the first and the second tumor ([k, j, i])."""
    first, second = np.zeros(shape, bool), np.zeros(shape, bool)
    first[:, :25, :25], second[:, 25:, 25:] = True, True
    return first, second


def tumor_segment_at(segmentation, volume, ijk) -> str:
    """The id of the tumor segment that holds voxel (i, j, k)."""
    ids = logic.module_segment_ids(segmentation)["tumor"]
    (found,) = [i for i, mask in zip(ids, segment_masks(segmentation, volume, ids)) if mask[ijk[::-1]]]
    return found


def labelmap_mtime(segmentation, segment_id) -> int:
    return segmentation.GetSegmentation().GetSegment(segment_id).GetRepresentation("Binary labelmap").GetMTime()


@pytest.fixture
def two_tumor_segments(two_tumors):
    """``two_tumors`` with one segment per tumor."""
    ct, truth, volume, segmentation = two_tumors
    logic.write_segments(segmentation, volume, shrunk(truth), per_tumor=True)
    return ct, truth, volume, segmentation


def test_a_click_in_per_tumor_mode_rewrites_the_clicked_tumors_segment_and_no_other(two_tumor_segments):
    ct, truth, volume, segmentation = two_tumor_segments
    clicked, other = (tumor_segment_at(segmentation, volume, ijk) for ijk in (FIRST_TUMOR, SECOND_TUMOR))
    other_before, other_mtime = segment_masks(segmentation, volume, [other])[0], labelmap_mtime(segmentation, other)
    expected = Refiner(Bright(), CPU).click(ct, shrunk(truth), FIRST_TUMOR)

    click(volume, segmentation, ijk_to_ras(ct, FIRST_TUMOR))

    first, _second = halves(truth.shape)
    np.testing.assert_array_equal(segment_masks(segmentation, volume, [clicked])[0], (expected.labels == TUMOR) & first)
    np.testing.assert_array_equal(segment_masks(segmentation, volume, [other])[0], other_before)
    assert labelmap_mtime(segmentation, other) == other_mtime, "the other tumor's segment was rewritten"


def test_per_tumor_segments_of_equal_size_carry_the_numbers_of_the_report(two_tumors):
    """The two tumors are of one size, in a volume stored flipped: "Liver tumor n" holds the
    report's (and the results table's) tumor n."""
    ct, truth, volume, segmentation = two_tumors
    labels = shrunk(truth)
    logic.write_segments(segmentation, volume, labels, per_tumor=True)
    report = logic.measure(logic.image_from_volume(volume), labels)
    assert [tumor.volume_ml for tumor in report.tumors] == [report.tumors[0].volume_ml] * 2
    for tumor in report.tumors:
        segment_id = tumor_segment_at(segmentation, volume, tumor.centroid_ijk)
        assert segmentation.GetSegmentation().GetSegment(segment_id).GetName() == f"Liver tumor {tumor.id}"


@pytest.mark.parametrize("per_tumor, names", [(False, ["Liver", "Liver tumor"]),
                                              (True, ["Liver", "Liver tumor 1", "Liver tumor 2"])])
def test_a_lesion_added_by_a_click_joins_the_tumor_segment_or_gets_its_own(two_tumors, per_tumor, names):
    ct, truth, volume, segmentation = two_tumors
    missed = shrunk(truth)
    missed[(missed == TUMOR) & halves(truth.shape)[1]] = LIVER
    logic.write_segments(segmentation, volume, missed, per_tumor=per_tumor)

    expected = Refiner(Bright(), CPU).click(ct, missed, SECOND_TUMOR)

    assert click(volume, segmentation, ijk_to_ras(ct, SECOND_TUMOR)) == "lesion added"
    assert segment_names(segmentation) == names
    np.testing.assert_array_equal(logic.labels_from_segments(segmentation, volume), expected.labels)
    new_segment = tumor_segment_at(segmentation, volume, SECOND_TUMOR)
    assert segmentation.GetSegmentation().GetSegment(new_segment).GetName() == names[-1]


def test_a_negative_click_in_per_tumor_mode_leaves_the_removed_tumors_segment_empty(two_tumor_segments):
    ct, _truth, volume, segmentation = two_tumor_segments
    removed, kept = (tumor_segment_at(segmentation, volume, ijk) for ijk in (FIRST_TUMOR, SECOND_TUMOR))
    kept_before = segment_masks(segmentation, volume, [kept])[0]

    click(volume, segmentation, ijk_to_ras(ct, FIRST_TUMOR), positive=False)

    assert set(logic.module_segment_ids(segmentation)["tumor"]) == {removed, kept}
    assert not segment_masks(segmentation, volume, [removed])[0].any()
    np.testing.assert_array_equal(segment_masks(segmentation, volume, [kept])[0], kept_before)


def test_refine_all_in_per_tumor_mode_keeps_each_tumor_in_its_own_segment(two_tumor_segments):
    ct, truth, volume, segmentation = two_tumor_segments
    segments = [tumor_segment_at(segmentation, volume, ijk) for ijk in (FIRST_TUMOR, SECOND_TUMOR)]

    expected = Refiner(Bright(), CPU).refine_all(ct, shrunk(truth))
    refine_all(volume, segmentation)

    for segment_id, half in zip(segments, halves(truth.shape)):
        np.testing.assert_array_equal(segment_masks(segmentation, volume, [segment_id])[0],
                                      (expected.labels == TUMOR) & half)


# ------------------------------------------------------------------------------ results


def test_the_results_table_has_one_row_per_tumor_and_the_liver_volume_and_burden(two_tumors):
    ct, _truth, volume, segmentation = two_tumors
    report = logic.measure_segments(segmentation, volume)
    table = volume.GetScene().AddNewNodeByClass("vtkMRMLTableNode", "Results")
    logic.write_results_table(table, report)
    assert table.GetNumberOfRows() == len(report.tumors) == 2
    assert [table.GetColumnName(c) for c in range(4)] == ["Tumor", "Volume (mL)", "Longest axial diameter (mm)", "Mean HU"]
    assert table.GetCellText(0, 1) == str(report.tumors[0].volume_ml)
    assert float(table.GetAttribute("LiverTumorDARN.LiverVolumeMl")) == report.liver_volume_ml
    assert float(table.GetAttribute("LiverTumorDARN.TumorBurdenPercent")) == report.tumor_burden_percent


def test_the_results_table_centroid_is_the_tumors_world_ras_position(two_tumors):
    ct, _truth, volume, segmentation = two_tumors
    report = logic.measure_segments(segmentation, volume)
    table = volume.GetScene().AddNewNodeByClass("vtkMRMLTableNode", "Results")
    logic.write_results_table(table, report)
    centroid_ras = [float(table.GetCellText(0, c)) for c in (4, 5, 6)]
    assert logic.ras_to_ijk(volume, centroid_ras) == report.tumors[0].centroid_ijk


def test_a_click_on_a_results_row_finds_that_rows_tumor_below_the_row_of_column_titles(two_tumors):
    """The table view shows the column titles as its first row (qMRMLTableModel::mrmlTableRowIndex)."""
    _ct, _truth, volume, segmentation = two_tumors
    report = logic.measure_segments(segmentation, volume)
    table = volume.GetScene().AddNewNodeByClass("vtkMRMLTableNode", "Results")
    logic.write_results_table(table, report)
    first, last = (logic.ras_to_ijk(volume, logic.tumor_centroid_in_view_row(table, row)) for row in (1, 2))
    assert (first, last) == (report.tumors[0].centroid_ijk, report.tumors[1].centroid_ijk)
    assert logic.tumor_centroid_in_view_row(table, 0) is None  # the titles
    assert logic.tumor_centroid_in_view_row(table, 3) is None  # below the last tumor
    table.SetUseColumnTitleAsColumnHeader(True)
    assert logic.ras_to_ijk(volume, logic.tumor_centroid_in_view_row(table, 0)) == report.tumors[0].centroid_ijk


class Slicer58TableNode(slicer.vtkMRMLTableNode):
    """A table node as Slicer 5.8 names the header switch (UseColumnName..., not UseColumnTitle...)."""

    @property
    def GetUseColumnTitleAsColumnHeader(self):
        raise AttributeError("not in this Slicer")


def test_the_row_of_column_titles_is_found_with_the_older_name_of_the_header_switch(two_tumors):
    _ct, _truth, volume, segmentation = two_tumors
    report = logic.measure_segments(segmentation, volume)
    table = Slicer58TableNode()
    logic.write_results_table(table, report)
    assert logic.tumor_centroid_in_view_row(table, 0) is None
    assert logic.ras_to_ijk(volume, logic.tumor_centroid_in_view_row(table, 1)) == report.tumors[0].centroid_ijk


# ------------------------------------------------------------------------------ Slicer 5.8's API


class Slicer58Segment(slicer.vtkSegment):
    """A segment as in Slicer 5.8, whose vtkSegment has no SetTerminology (it came with 5.10)."""

    @property
    def SetTerminology(self):
        raise AttributeError("not in this Slicer")


class Slicer58TerminologyEntry(slicer.vtkSlicerTerminologyEntry):
    """A terminology entry as in Slicer 5.8: "anatomic" names only, no "region" ones."""

    @property
    def SetRegionContextName(self):
        raise AttributeError("not in this Slicer")


def test_a_segment_of_slicer_5_8_gets_its_terminology_in_the_tag_that_slicer_reads():
    segment = Slicer58Segment()
    assert not hasattr(segment, "SetTerminology")
    logic.set_terminology(segment, TUMOR_TERMINOLOGY)
    assert segment.GetTerminology() == TUMOR_TERMINOLOGY
    assert logic._tag(segment, slicer.vtkSegment.GetTerminologyEntryTagName()) == TUMOR_TERMINOLOGY


def test_a_terminology_entry_of_slicer_5_8_serializes_to_the_same_codes(monkeypatch):
    from LiverTumorDARNLib.labels import SEGMENTS

    liver, tumor = (next(spec for spec in SEGMENTS if spec.label == label) for label in (LIVER, TUMOR))
    assert not hasattr(Slicer58TerminologyEntry(), "SetRegionContextName")
    monkeypatch.setattr(slicer, "vtkSlicerTerminologyEntry", Slicer58TerminologyEntry)
    assert (logic.terminology_entry(liver), logic.terminology_entry(tumor)) == (LIVER_TERMINOLOGY, TUMOR_TERMINOLOGY)
