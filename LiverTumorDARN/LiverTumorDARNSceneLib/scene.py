"""Scene work of the module: between MRML nodes and the core's SimpleITK images and label arrays.

Qt-free and global-free: every function takes the nodes (or the scene) it works on, so the same
code runs in the Slicer application and, with the PyPI package ``slicer-core``, in CI.

Geometry. A volume node's voxels are indexed (i, j, k) and placed by its IJK-to-RAS matrix
(flips, oblique directions) and, above that, by its parent transform. The CT handed to the core
is the volume in world coordinates (the parent transform hardened) and in ITK's LPS frame, so the
core's physical measurements (report centroids) are world positions. Segments are written on the
volume's own grid, and the segmentation node is put under the volume's parent transform, so
label voxel (i, j, k) covers exactly CT voxel (i, j, k).

Ownership. The segments this module writes carry the tag :data:`ROLE_TAG`; a re-run removes only
tagged segments, so segments the user made in the same node survive.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

import slicer
import slicer.util
from LiverTumorDARNLib.errors import InputError
from LiverTumorDARNLib.labels import LIVER, SEGMENTS, TUMOR, Code, Segment
from LiverTumorDARNLib.outputs import SLICER_ANATOMIC_CONTEXT, SLICER_TERMINOLOGY_CONTEXT
from LiverTumorDARNLib.report import CaseReport

ROLE_TAG = "LiverTumorDARN.Role"
"""Segment tag naming what a segment of this module holds ("liver" or "tumor")."""

ROLES = {LIVER: "liver", TUMOR: "tumor"}
"""The role tag of each label value's segment."""

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

ORTHOGONALITY_TOLERANCE = 1e-4
"""How far from orthonormal the world axes may be (ITK images need orthonormal directions)."""

CONVERTER_RULES = (
    "vtkBinaryLabelmapToClosedSurfaceConversionRule",
    "vtkClosedSurfaceToBinaryLabelmapConversionRule",
    "vtkClosedSurfaceToFractionalLabelmapConversionRule",
    "vtkFractionalLabelmapToClosedSurfaceConversionRule",
)

RESULT_COLUMNS = (
    ("Tumor", "int"),
    ("Volume (mL)", "double"),
    ("Longest axial diameter (mm)", "double"),
    ("Mean HU", "double"),
    ("Centroid R (mm)", "double"),
    ("Centroid A (mm)", "double"),
    ("Centroid S (mm)", "double"),
)
"""Columns of the results table; the centroid (world RAS) lets a row centre the views on its tumor."""


# --------------------------------------------------------------------------------------------
# Set-up


def register_segmentation_converters() -> None:
    """Register the segment representation converters once per process.

    The Slicer application registers them at start-up; ``slicer-core`` does not, and without
    them a segmentation cannot even hold an empty binary labelmap segment.
    """
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    registered = {rule.GetClassName() for rule in factory.GetConverterRules()}
    for name in CONVERTER_RULES:
        if name not in registered:
            factory.RegisterConverterRule(getattr(slicer, name)())


# --------------------------------------------------------------------------------------------
# Volume node <-> SimpleITK image


def _array_from_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def _matrix_from_array(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, float(array[row, column]))
    return matrix


def local_ijk_to_ras(volume_node) -> np.ndarray:
    """The volume's own IJK-to-RAS matrix, without its parent transform."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return _array_from_matrix(matrix)


def world_ijk_to_ras(volume_node) -> np.ndarray:
    """IJK to world RAS: the volume's matrix with its parent transforms applied.

    A non-linear parent transform would bend the grid, which no image grid can express, so it is
    refused rather than approximated.
    """
    parent = volume_node.GetParentTransformNode()
    if parent is None:
        return local_ijk_to_ras(volume_node)
    if not parent.IsTransformToWorldLinear():
        raise InputError(f"{volume_node.GetName()}: its transform '{parent.GetName()}' is not linear; "
                         f"harden it (Transforms module) or remove it before segmenting")
    to_world = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(to_world)
    return _array_from_matrix(to_world) @ local_ijk_to_ras(volume_node)


def image_from_volume(volume_node) -> sitk.Image:
    """The volume as a SimpleITK image in world LPS coordinates, voxel for voxel."""
    if volume_node is None or volume_node.GetImageData() is None:
        raise InputError("no CT volume selected, or the volume holds no voxels")
    voxels = slicer.util.arrayFromVolume(volume_node)
    if voxels.ndim != 3:
        raise InputError(f"{volume_node.GetName()}: voxels have shape {voxels.shape}; expected a 3D scalar volume")
    ijk_to_lps = RAS_TO_LPS @ world_ijk_to_ras(volume_node)
    columns = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    direction = columns / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=ORTHOGONALITY_TOLERANCE):
        raise InputError(f"{volume_node.GetName()}: its voxel axes are not perpendicular in world space "
                         f"(a sheared transform); harden a rigid transform only")
    image = sitk.GetImageFromArray(np.ascontiguousarray(voxels))  # [k, j, i] -> size (i, j, k)
    image.SetSpacing(spacing.tolist())
    image.SetDirection(direction.ravel().tolist())
    image.SetOrigin(ijk_to_lps[:3, 3].tolist())
    return image


def ras_to_ijk(volume_node, point_ras) -> tuple[int, int, int]:
    """The voxel index (i, j, k) of the volume that contains a world RAS point."""
    ras_to_ijk_matrix = np.linalg.inv(world_ijk_to_ras(volume_node))
    ijk = ras_to_ijk_matrix @ np.array([*point_ras, 1.0])
    return tuple(int(v) for v in np.floor(ijk[:3] + 0.5))


# --------------------------------------------------------------------------------------------
# Segments


def terminology_entry(segment: Segment) -> str:
    """The segment's codes as Slicer's ``TerminologyEntry`` tag string, made by Slicer's own
    serializer (context~category~type~type modifier~anatomic context~region~region modifier)."""
    entry = slicer.vtkSlicerTerminologyEntry()
    entry.SetTerminologyContextName(SLICER_TERMINOLOGY_CONTEXT)
    # Slicer 5.8 renamed "anatomic" to "region"; older releases have only the old names.
    renamed = hasattr(entry, "SetRegionContextName")
    (entry.SetRegionContextName if renamed else entry.SetAnatomicContextName)(SLICER_ANATOMIC_CONTEXT)
    _set_code(entry.GetCategoryObject(), segment.category)
    _set_code(entry.GetTypeObject(), segment.type)
    if segment.anatomic_region is not None:
        _set_code(entry.GetRegionObject() if renamed else entry.GetAnatomicRegionObject(), segment.anatomic_region)
    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(entry)


def _set_code(item, code: Code) -> None:
    item.SetCodingSchemeDesignator(code.scheme)
    item.SetCodeValue(code.value)
    item.SetCodeMeaning(code.meaning)


def module_segment_ids(segmentation_node) -> dict[str, str]:
    """Segment id by role tag, for the segments this module wrote."""
    segmentation = segmentation_node.GetSegmentation()
    found = {}
    for segment_id in segmentation.GetSegmentIDs():
        role = _role(segmentation.GetSegment(segment_id))
        if role:
            found[role] = segment_id
    return found


def _role(segment) -> str:
    value = ""
    tag = vtk.reference("")
    if segment.GetTag(ROLE_TAG, tag):
        value = str(tag)
    return value


def _oriented_labelmap(mask: np.ndarray, volume_node, box: tuple[slice, slice, slice]) -> slicer.vtkOrientedImageData:
    """A binary labelmap on the volume's own grid covering ``box`` ([k, j, i] slices of the volume)."""
    image = slicer.vtkOrientedImageData()
    (k0, k1), (j0, j1), (i0, i1) = ((s.start, s.stop) for s in box)
    image.SetExtent(i0, i1 - 1, j0, j1 - 1, k0, k1 - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = mask.astype(np.uint8).ravel()
    image.SetImageToWorldMatrix(_matrix_from_array(local_ijk_to_ras(volume_node)))
    return image


def _full_box(labels: np.ndarray) -> tuple[slice, slice, slice]:
    return tuple(slice(0, n) for n in labels.shape)


def _replace_segment(segmentation_node, segment_id: str, mask: np.ndarray, volume_node) -> None:
    """The whole segment becomes ``mask`` (a label array's shape, on the volume's grid)."""
    labelmap = _oriented_labelmap(mask, volume_node, _full_box(mask))
    if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            labelmap, segmentation_node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE):
        raise RuntimeError(f"could not write segment {segment_id} of {segmentation_node.GetName()}")


def _replace_inside_box(segmentation_node, segment_id: str, mask: np.ndarray, volume_node, box) -> None:
    """Inside ``box`` the segment becomes ``mask`` (given on the box); outside it nothing changes.

    Slicer's MODE_REPLACE rewrites a whole segment, so the box is set the way the Segment
    Editor's effects set a region: a minimum with the mask (removes what left the segment), then
    a masked merge (adds what joined it), both limited to the box's extent. This is exact only on
    a segment that has its own labelmap layer, which :func:`write_segments` gives each segment.
    """
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    labelmap = _oriented_labelmap(mask, volume_node, box)
    extent = labelmap.GetExtent()
    for mode in (logic.MODE_MERGE_MIN, logic.MODE_MERGE_MASK):
        if not logic.SetBinaryLabelmapToSegment(labelmap, segmentation_node, segment_id, mode, extent):
            raise RuntimeError(f"could not write segment {segment_id} of {segmentation_node.GetName()}")


def write_segments(segmentation_node, volume_node, labels: np.ndarray) -> dict[str, str]:
    """Replace this module's "Liver" and "Liver tumor" segments by those of ``labels``
    ([k, j, i] on the volume's grid: 0 background, 1 liver, 2 tumor); other segments stay.

    Returns the segment id by role.
    """
    _check_labels_fit(labels, volume_node)
    register_segmentation_converters()
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    segmentation = segmentation_node.GetSegmentation()
    for segment_id in module_segment_ids(segmentation_node).values():
        segmentation.RemoveSegment(segment_id)
    written = {}
    for spec in SEGMENTS:
        segment_id = segmentation.AddEmptySegment("", spec.name, [c / 255 for c in spec.color])
        segment = segmentation.GetSegment(segment_id)
        segment.SetTag(ROLE_TAG, ROLES[spec.label])
        segment.SetTerminology(terminology_entry(spec))
        segmentation.SeparateSegmentLabelmap(segment_id)  # its own layer: see _replace_inside_box
        _replace_segment(segmentation_node, segment_id, labels == spec.label, volume_node)
        written[ROLES[spec.label]] = segment_id
    return written


def _check_labels_fit(labels: np.ndarray, volume_node) -> None:
    shape = slicer.util.arrayFromVolume(volume_node).shape
    if labels.shape != shape:
        raise InputError(f"label array of shape {labels.shape} does not fit {volume_node.GetName()} ({shape})")


def labels_from_segments(segmentation_node, volume_node) -> np.ndarray:
    """The module's segments as one label array [k, j, i] on the volume's grid (0, 1 liver, 2 tumor),
    including every edit the user made to them in the Segment Editor."""
    ids = module_segment_ids(segmentation_node)
    missing = [role for role in ROLES.values() if role not in ids]
    if missing:
        raise InputError(f"{segmentation_node.GetName()} has no segment of this module for {', '.join(missing)}; "
                         f"run \"Segment tumors\" first")
    scene = segmentation_node.GetScene()
    labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        # Exported in this order, liver is label 1 and tumor label 2 (later segments win overlaps).
        segment_ids = [ids[ROLES[LIVER]], ids[ROLES[TUMOR]]]
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, segment_ids, labelmap_node, volume_node,
                slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
            raise RuntimeError(f"could not export the segments of {segmentation_node.GetName()}")
        return slicer.util.arrayFromVolume(labelmap_node).astype(np.uint8)
    finally:
        scene.RemoveNode(labelmap_node)


def apply_change(segmentation_node, volume_node, labels: np.ndarray, box) -> None:
    """Write the module's segments inside ``box`` only (a refinement's changed region); every
    voxel outside it, and every other segment, is left as it was."""
    if box is None:
        return
    ids = module_segment_ids(segmentation_node)
    for label, role in ROLES.items():
        _replace_inside_box(segmentation_node, ids[role], labels[box] == label, volume_node, box)


# --------------------------------------------------------------------------------------------
# The jobs: segment, click, refine all


def segment_volume(volume_node, segmentation_node, liver, tumor, device,
                   progress=lambda stage, fraction: None) -> CaseReport:
    """Segment the CT of ``volume_node`` in this process and write the segments; returns the report.

    (The panel runs the network in a subprocess instead, see ``worker``, and calls
    :func:`write_segments` and :func:`measure_segments` with its result.)
    """
    from LiverTumorDARNLib.io import check_ct
    from LiverTumorDARNLib.pipeline import segment

    ct = image_from_volume(volume_node)
    check_ct(ct, volume_node.GetName())
    result = segment(ct, liver, tumor, device, progress)
    labels = sitk.GetArrayFromImage(result.labels)
    write_segments(segmentation_node, volume_node, labels)
    return measure(ct, labels)


def measure(ct: sitk.Image, labels: np.ndarray) -> CaseReport:
    """The core's report for a label array on the CT's grid."""
    from LiverTumorDARNLib.report import measure as measure_case

    label_image = sitk.GetImageFromArray(labels.astype(np.uint8))
    label_image.CopyInformation(ct)
    return measure_case(ct, label_image)


def measure_segments(segmentation_node, volume_node) -> CaseReport:
    """The report of the module's segments as they are now (after any refinement or edit)."""
    return measure(image_from_volume(volume_node), labels_from_segments(segmentation_node, volume_node))


def refine_click(volume_node, segmentation_node, refiner, point_ras, positive: bool = True):
    """One click at a world RAS point: the refiner edits the label map and only the changed box
    of the segments is rewritten. Returns the core's ``Change`` (its message is for the user)."""
    ct = image_from_volume(volume_node)
    change = refiner.click(ct, labels_from_segments(segmentation_node, volume_node),
                           ras_to_ijk(volume_node, point_ras), positive)
    apply_change(segmentation_node, volume_node, change.labels, change.box)
    return change


def refine_all(volume_node, segmentation_node, refiner):
    """Every tumor of the module's segments refined; only the changed box is rewritten."""
    ct = image_from_volume(volume_node)
    change = refiner.refine_all(ct, labels_from_segments(segmentation_node, volume_node))
    apply_change(segmentation_node, volume_node, change.labels, change.box)
    return change


# --------------------------------------------------------------------------------------------
# Results


def write_results_table(table_node, report: CaseReport) -> None:
    """One row per tumor (numbered as in the report, largest first); the liver volume, tumor volume
    and burden go into node attributes, saved with the scene."""
    table_node.RemoveAllColumns()
    columns = {}
    for name, kind in RESULT_COLUMNS:
        column = table_node.AddColumn(vtk.vtkIntArray() if kind == "int" else vtk.vtkDoubleArray())
        column.SetName(name)
        columns[name] = column
    for tumor in report.tumors:
        row = table_node.AddEmptyRow()
        r, a, s = -tumor.centroid_mm[0], -tumor.centroid_mm[1], tumor.centroid_mm[2]  # LPS -> RAS
        values = (tumor.id, tumor.volume_ml, tumor.longest_axial_diameter_mm, tumor.mean_hu, r, a, s)
        for (name, _kind), value in zip(RESULT_COLUMNS, values):
            table_node.GetTable().SetValue(row, list(columns).index(name), vtk.vtkVariant(value))
    table_node.SetAttribute("LiverTumorDARN.LiverVolumeMl", str(report.liver_volume_ml))
    table_node.SetAttribute("LiverTumorDARN.TumorVolumeMl", str(report.tumor_volume_ml))
    table_node.SetAttribute("LiverTumorDARN.TumorBurdenPercent", str(report.tumor_burden_percent))
    table_node.Modified()


def summary(report: CaseReport) -> str:
    """One line for the panel: liver volume, tumor count and volume, burden."""
    count = len(report.tumors)
    return (f"Liver {report.liver_volume_ml:.1f} mL; {count} tumor{'s' if count != 1 else ''}, "
            f"{report.tumor_volume_ml:.1f} mL; tumor burden {report.tumor_burden_percent:.2f} %")
