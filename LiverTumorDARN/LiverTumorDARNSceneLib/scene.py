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

Tumor segments. Either one "Liver tumor" segment holds every tumor, or (``per_tumor``) each tumor
has its own segment, "Liver tumor 1", "Liver tumor 2", ... numbered largest first as the results
table numbers them when they are written, each tagged with its number (:data:`TUMOR_NUMBER_TAG`). Edits follow what the node holds:
a refined tumor stays in the segment that held it, a new lesion gets the next number, and a removed
tumor leaves its segment empty rather than deleting it, so segment names, colours and the user's
own edits keep pointing at the same lesion, and an undo restores it in place.

Slicer versions. The module runs in Slicer 5.8 (Python 3.9) and newer; where an API differs
between versions, the function that uses it names the versions. The package that first use
installs (connected-components-3d) is imported inside the functions that need it, so that the
panel can import this module before it has asked to install it.
"""

from __future__ import annotations

import colorsys
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

import slicer
import slicer.util
from LiverTumorDARNLib.errors import InputError
from LiverTumorDARNLib.labels import LIVER, SEGMENTS, TUMOR, Code, Segment
from LiverTumorDARNLib.outputs import SLICER_ANATOMIC_CONTEXT, SLICER_TERMINOLOGY_CONTEXT
from LiverTumorDARNLib.regions import whole

if TYPE_CHECKING:
    from LiverTumorDARNLib.report import CaseReport

ROLE_TAG = "LiverTumorDARN.Role"
"""Segment tag naming what a segment of this module holds ("liver" or "tumor")."""

ROLES = {LIVER: "liver", TUMOR: "tumor"}
"""The role tag of each label value's segment."""

TUMOR_NUMBER_TAG = "LiverTumorDARN.TumorNumber"
"""Segment tag with a per-tumor segment's number ("3" for "Liver tumor 3"); the one combined
"Liver tumor" segment has none."""

TUMOR_HUE_STEPS = (0.0, 0.06, -0.06, 0.12, -0.12)
"""Hue offsets (fractions of the colour circle) that tell neighbouring per-tumor segments apart
while keeping them all shades of the tumor colour."""

LIVER_SEGMENT, TUMOR_SEGMENT = (next(spec for spec in SEGMENTS if spec.label == label) for label in (LIVER, TUMOR))

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
    return on_volume_grid(voxels, volume_node)


def on_volume_grid(array: np.ndarray, volume_node) -> sitk.Image:
    """A [k, j, i] array of the volume's grid as a SimpleITK image placed where the volume lies in
    world LPS coordinates."""
    ijk_to_lps = RAS_TO_LPS @ world_ijk_to_ras(volume_node)
    columns = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    direction = columns / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=ORTHOGONALITY_TOLERANCE):
        raise InputError(f"{volume_node.GetName()}: its voxel axes are not perpendicular in world space "
                         f"(a sheared transform); harden a rigid transform only")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))  # [k, j, i] -> size (i, j, k)
    image.SetSpacing(spacing.tolist())
    image.SetDirection(direction.ravel().tolist())
    image.SetOrigin(ijk_to_lps[:3, 3].tolist())
    return image


def volume_state(volume_node) -> tuple:
    """What :func:`image_from_volume` reads: equal states give equal images, so a caller may keep
    the image it read instead of copying a large CT again."""
    image = volume_node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        return (volume_node.GetID(),)
    return (volume_node.GetID(), image.GetMTime(), image.GetPointData().GetScalars().GetMTime(),
            tuple(world_ijk_to_ras(volume_node).ravel()))


def set_volume_from_image(volume_node, image: sitk.Image) -> None:
    """Voxels and geometry of a SimpleITK image (LPS) into a volume node: the inverse of
    :func:`image_from_volume` for a volume without parent transform."""
    slicer.util.updateVolumeFromArray(volume_node, sitk.GetArrayFromImage(image))  # [k, j, i] both
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    ijk_to_lps[:3, 3] = image.GetOrigin()
    volume_node.SetIJKToRASMatrix(_matrix_from_array(RAS_TO_LPS @ ijk_to_lps))  # the flip is its own inverse


def add_phantom_case(mrml_scene, seed: int, small: bool = False):
    """The synthetic CT phantom of ``seed`` as a new volume node, with its true liver and tumors as
    this module's segments in a new segmentation node; returns (volume node, segmentation node).

    The phantom is drawn here from its seed (``phantom.generate_case``): nothing is downloaded.
    """
    from LiverTumorDARNLib.phantom import generate_case

    case = generate_case(seed, small=small)
    name = f"LiverPhantom{seed}"
    volume_node = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    set_volume_from_image(volume_node, case.image)
    volume_node.CreateDefaultDisplayNodes()
    segmentation_node = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name} truth")
    segmentation_node.CreateDefaultDisplayNodes()
    write_segments(segmentation_node, volume_node, sitk.GetArrayFromImage(case.labels))
    return volume_node, segmentation_node


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
    # Slicer 5.10 renamed "anatomic" to "region" (the old names stay, deprecated); 5.8 has only the old ones.
    renamed = hasattr(entry, "SetRegionContextName")
    (entry.SetRegionContextName if renamed else entry.SetAnatomicContextName)(SLICER_ANATOMIC_CONTEXT)
    _set_code(entry.GetCategoryObject(), segment.category)
    _set_code(entry.GetTypeObject(), segment.type)
    if segment.anatomic_region is not None:
        _set_code(entry.GetRegionObject() if renamed else entry.GetAnatomicRegionObject(), segment.anatomic_region)
    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(entry)


def set_terminology(segment, entry: str) -> None:
    """Give a segment its terminology entry (a :func:`terminology_entry` string).

    Slicer 5.10 added ``vtkSegment.SetTerminology``; 5.8 keeps the entry in the segment's
    ``TerminologyEntry`` tag, which the newer releases still read.
    """
    if hasattr(segment, "SetTerminology"):
        segment.SetTerminology(entry)
    else:
        segment.SetTag(segment.GetTerminologyEntryTagName(), entry)


def _set_code(item, code: Code) -> None:
    item.SetCodingSchemeDesignator(code.scheme)
    item.SetCodeValue(code.value)
    item.SetCodeMeaning(code.meaning)


def module_segment_ids(segmentation_node) -> dict[str, list[str]]:
    """The ids of the segments this module wrote, by role ("liver", "tumor"), in the node's order."""
    segmentation = segmentation_node.GetSegmentation()
    found = {role: [] for role in ROLES.values()}
    for segment_id in segmentation.GetSegmentIDs():
        role = _tag(segmentation.GetSegment(segment_id), ROLE_TAG)
        if role in found:
            found[role].append(segment_id)
    return found


def _tag(segment, name: str) -> str:
    """The segment's tag ``name``, or "" when it has none."""
    value = vtk.reference("")
    return str(value) if segment.GetTag(name, value) else ""


def _tumor_numbers(segmentation_node, tumor_ids: list[str]) -> list[int | None]:
    """Each tumor segment's number; None for the one combined "Liver tumor" segment."""
    segmentation = segmentation_node.GetSegmentation()
    tags = (_tag(segmentation.GetSegment(segment_id), TUMOR_NUMBER_TAG) for segment_id in tumor_ids)
    return [int(tag) if tag else None for tag in tags]


def tumor_color(number: int) -> tuple[float, float, float]:
    """The colour (RGB 0-1) of segment "Liver tumor ``number``": the tumor colour, its hue shifted a
    little, so that neighbouring tumors are told apart and all still read as tumor."""
    hue, lightness, saturation = colorsys.rgb_to_hls(*(c / 255 for c in TUMOR_SEGMENT.color))
    shifted = (hue + TUMOR_HUE_STEPS[(number - 1) % len(TUMOR_HUE_STEPS)]) % 1.0
    return colorsys.hls_to_rgb(shifted, lightness, saturation)


def _grid(volume_node, box: tuple[slice, slice, slice]) -> slicer.vtkOrientedImageData:
    """An image without voxels: the volume's own grid over ``box`` ([k, j, i] slices of the volume)."""
    image = slicer.vtkOrientedImageData()
    (k0, k1), (j0, j1), (i0, i1) = ((s.start, s.stop) for s in box)
    image.SetExtent(i0, i1 - 1, j0, j1 - 1, k0, k1 - 1)
    image.SetImageToWorldMatrix(_matrix_from_array(local_ijk_to_ras(volume_node)))
    return image


def _oriented_labelmap(mask: np.ndarray, volume_node, box: tuple[slice, slice, slice]) -> slicer.vtkOrientedImageData:
    """A binary labelmap on the volume's own grid covering ``box``."""
    image = _grid(volume_node, box)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = mask.astype(np.uint8).ravel()
    return image


def _replace_segment(segmentation_node, segment_id: str, mask: np.ndarray, volume_node, box=None) -> None:
    """The segment becomes ``mask`` and nothing else: ``mask`` covers ``box`` of the volume's grid,
    or without a box the whole grid."""
    labelmap = _oriented_labelmap(mask, volume_node, box or whole(mask))
    if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            labelmap, segmentation_node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE):
        raise RuntimeError(f"could not write segment {segment_id} of {segmentation_node.GetName()}")


def _replace_inside_box(segmentation_node, segment_id: str, mask: np.ndarray, volume_node, box,
                        before: np.ndarray | None = None) -> None:
    """Inside ``box`` the segment becomes ``mask`` (given on the box); outside it nothing changes.

    Slicer's MODE_REPLACE rewrites a whole segment, so the box is set the way the Segment
    Editor's effects set a region: a minimum with the mask (removes what left the segment), then
    a masked merge (adds what joined it), both limited to the box's extent. This is exact only on
    a segment that has its own labelmap layer, which :func:`write_segments` gives each segment.
    Where the segment's voxels in the box are known (``before``), only the merges that change
    something run: each costs 7-20 ms on a 512x512x200 scan whatever the box's size, and a click
    mostly adds to one segment what it takes from another.
    """
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    modes = [logic.MODE_MERGE_MIN, logic.MODE_MERGE_MASK]
    if before is not None:
        modes = [mode for mode, needed in ((logic.MODE_MERGE_MIN, (before & ~mask).any()),
                                           (logic.MODE_MERGE_MASK, (mask & ~before).any())) if needed]
    if not modes:
        return
    labelmap = _oriented_labelmap(mask, volume_node, box)
    extent = labelmap.GetExtent()
    for mode in modes:
        if not logic.SetBinaryLabelmapToSegment(labelmap, segmentation_node, segment_id, mode, extent):
            raise RuntimeError(f"could not write segment {segment_id} of {segmentation_node.GetName()}")


def write_segments(segmentation_node, volume_node, labels: np.ndarray, per_tumor: bool = False) -> dict[str, list[str]]:
    """Replace this module's segments by those of ``labels`` ([k, j, i] on the volume's grid:
    0 background, 1 liver, 2 tumor): "Liver" and "Liver tumor", or with ``per_tumor`` one segment
    per connected tumor, largest first. Segments the module did not write stay as they are.

    Returns the segment ids by role, as :func:`module_segment_ids`.
    """
    _check_labels_fit(labels, volume_node)
    register_segmentation_converters()
    # The transform first: Slicer stores the reference grid in the segmentation's own frame, which
    # is then the volume's, so the grid is the volume's own (what _check_on_volume_grid reads).
    segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    for segment_ids in module_segment_ids(segmentation_node).values():
        for segment_id in segment_ids:
            segmentation_node.GetSegmentation().RemoveSegment(segment_id)
    liver_id = _add_segment(segmentation_node, LIVER_SEGMENT)
    _replace_segment(segmentation_node, liver_id, labels == LIVER, volume_node)
    if not per_tumor:
        tumor_id = _add_segment(segmentation_node, TUMOR_SEGMENT)
        _replace_segment(segmentation_node, tumor_id, labels == TUMOR, volume_node)
        return {"liver": [liver_id], "tumor": [tumor_id]}
    tumor_ids = []
    for number, (mask, box) in enumerate(tumors_by_size(labels, volume_node), start=1):
        tumor_ids.append(_add_segment(segmentation_node, TUMOR_SEGMENT, number))
        _replace_segment(segmentation_node, tumor_ids[-1], mask, volume_node, box)
    return {"liver": [liver_id], "tumor": tumor_ids}


def tumors_by_size(labels: np.ndarray, volume_node) -> list[tuple[np.ndarray, tuple[slice, slice, slice]]]:
    """Each 26-connected tumor of ``labels`` ([k, j, i] on the volume's grid) in the report's order
    (largest first; equal sizes as the report orders them, which depends on the volume's world
    axes): its mask on its bounding box, and that box."""
    from scipy import ndimage

    from LiverTumorDARNLib.report import numbered_tumors

    numbers = numbered_tumors(on_volume_grid(labels.astype(np.uint8), volume_node))
    return [(numbers[box] == number, box) for number, box in enumerate(ndimage.find_objects(numbers), start=1)]


def _add_segment(segmentation_node, spec: Segment, number: int | None = None) -> str:
    """An empty segment of this module with its name, colour, terminology and tags; ``number``
    makes it the per-tumor segment "Liver tumor ``number``"."""
    segmentation = segmentation_node.GetSegmentation()
    name, color = spec.name, [c / 255 for c in spec.color]
    if number is not None:
        name, color = f"{spec.name} {number}", tumor_color(number)
    segment_id = segmentation.AddEmptySegment("", name, color)
    segment = segmentation.GetSegment(segment_id)
    segment.SetTag(ROLE_TAG, ROLES[spec.label])
    if number is not None:
        segment.SetTag(TUMOR_NUMBER_TAG, str(number))
    set_terminology(segment, terminology_entry(spec))
    segmentation.SeparateSegmentLabelmap(segment_id)  # its own layer: see _replace_inside_box
    return segment_id


def _check_labels_fit(labels: np.ndarray, volume_node) -> None:
    shape = slicer.util.arrayFromVolume(volume_node).shape
    if labels.shape != shape:
        raise InputError(f"label array of shape {labels.shape} does not fit {volume_node.GetName()} ({shape})")


def labels_from_segments(segmentation_node, volume_node) -> np.ndarray:
    """The module's segments as one label array [k, j, i] on the volume's grid (0, 1 liver, 2 tumor),
    whether the tumors share one segment or have one each, including every edit the user made to
    them in the Segment Editor."""
    ids = module_segment_ids(segmentation_node)
    if not ids["liver"]:
        raise InputError(f'{segmentation_node.GetName()} has no "{LIVER_SEGMENT.name}" segment of this module; '
                         f'run "Segment tumors" first')
    _check_on_volume_grid(segmentation_node, volume_node)
    # Merged in this order, liver is 1 and the tumor segments 2, 3, ... (later segments win
    # overlaps), so the minimum with TUMOR (= LIVER + 1) is the label: one pass over the volume,
    # where a comparison, a choice and two casts cost a tenth of a second of every click.
    merged = _merged_labels(segmentation_node, volume_node, ids["liver"][:1] + ids["tumor"])
    return np.minimum(merged, TUMOR).astype(np.uint8)


def segments_state(segmentation_node, volume_node) -> tuple:
    """What :func:`labels_from_segments` reads: the module's segments (ids and when their voxels
    last changed), the segmentation's grid and transform, and the volume's grid. Equal states give
    equal labels, so a caller may keep the labels it read: an edit in the Segment Editor, an undo
    or another volume changes the state."""
    segmentation = segmentation_node.GetSegmentation()
    segments = []
    for segment_id in [segment for role in module_segment_ids(segmentation_node).values() for segment in role]:
        labelmap = segmentation.GetSegment(segment_id).GetRepresentation(
            slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
        scalars = labelmap.GetPointData().GetScalars() if labelmap is not None else None
        segments.append((segment_id, labelmap.GetMTime() if labelmap is not None else 0,
                         scalars.GetMTime() if scalars is not None else 0))
    geometry = segmentation.GetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    return (tuple(segments), geometry, segmentation_node.GetTransformNodeID(), volume_node.GetID(),
            tuple(local_ijk_to_ras(volume_node).ravel()), volume_node.GetTransformNodeID())


def _check_on_volume_grid(segmentation_node, volume_node) -> None:
    """Refuse segments made on another grid than the volume's (another scan, or a resampled one):
    read onto this volume they would be resampled, and an edit written back would not fit them.
    The grid is the segmentation's reference geometry, which :func:`write_segments` takes from
    the volume it writes for."""
    geometry = segmentation_node.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    reference = slicer.vtkOrientedImageData()
    if not geometry or not slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry, reference):
        return  # segments without a reference grid keep their own: Slicer merges them as they are
    matrix = vtk.vtkMatrix4x4()
    reference.GetImageToWorldMatrix(matrix)
    volume_matrix = local_ijk_to_ras(volume_node)
    same = (tuple(reference.GetExtent()) == tuple(volume_node.GetImageData().GetExtent())
            and np.allclose(_array_from_matrix(matrix), volume_matrix, atol=1e-3 * np.abs(volume_matrix[:3, :3]).max()))
    if not same:
        raise InputError(f"{segmentation_node.GetName()} was made on another grid than {volume_node.GetName()}'s; "
                         f"select the volume it was made on, or segment this volume first")


def _merged_labels(segmentation_node, volume_node, segment_ids: list[str], box=None) -> np.ndarray:
    """Segments merged onto the volume's grid inside ``box`` (default: the whole grid), [k, j, i]:
    the n-th of ``segment_ids`` becomes value n + 1, later segments winning overlaps; all zero for
    no segment.

    Slicer's own merge (the one its label map export runs) onto a grid of our making: no temporary
    label map node, and a box costs what the box holds. Segments are written on the volume's own
    grid under the volume's transform (:func:`write_segments`), so the grid is read the same way.
    """
    box = box or whole(slicer.util.arrayFromVolume(volume_node))
    shape = tuple(s.stop - s.start for s in box)
    if not segment_ids:  # Slicer reads an empty list as "every segment", the user's included
        return np.zeros(shape, np.int16)
    if segmentation_node.GetTransformNodeID() != volume_node.GetTransformNodeID():
        raise InputError(f"{segmentation_node.GetName()} and {volume_node.GetName()} are under different "
                         f"transforms; put the segmentation under the volume's transform (Transforms module)")
    ids = vtk.vtkStringArray()
    for segment_id in segment_ids:
        ids.InsertNextValue(segment_id)
    merged = slicer.vtkOrientedImageData()
    if not segmentation_node.GenerateMergedLabelmapForAllSegments(
            merged, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, _grid(volume_node, box), ids):
        raise RuntimeError(f"could not read the segments of {segmentation_node.GetName()}")
    return numpy_support.vtk_to_numpy(merged.GetPointData().GetScalars()).reshape(shape).copy()


def apply_change(segmentation_node, volume_node, labels: np.ndarray, box, before: np.ndarray | None = None) -> None:
    """Write the module's segments inside ``box`` only (a refinement's changed region); every voxel
    outside it, and every segment whose voxels in the box stay the same, is left as it was.
    ``before``: the labels the module's segments hold now, where the caller knows them (a click
    session that read them and saw no edit since), which spares the merges that change nothing.

    The tumors follow the node's own layout (see the module docstring): with one tumor segment per
    tumor a new lesion gets a new segment, and a tumor segment not involved is never rewritten.
    """
    if box is None:
        return

    def held(label: int) -> np.ndarray | None:
        return None if before is None else before[box] == label

    ids = module_segment_ids(segmentation_node)
    _replace_inside_box(segmentation_node, ids["liver"][0], labels[box] == LIVER, volume_node, box, held(LIVER))
    tumor_ids = ids["tumor"]
    numbers = _tumor_numbers(segmentation_node, tumor_ids)
    if numbers == [None]:  # the one "Liver tumor" segment holds every tumor
        _replace_inside_box(segmentation_node, tumor_ids[0], labels[box] == TUMOR, volume_node, box, held(TUMOR))
        return
    window = tuple(slice(max(0, s.start - 1), min(n, s.stop + 1)) for s, n in zip(box, labels.shape))
    inner = tuple(slice(b.start - w.start, b.stop - w.start) for b, w in zip(box, window))
    owners_before = _merged_labels(segmentation_node, volume_node, tumor_ids, window)
    owners_after = tumor_owners(labels[window] == TUMOR, owners_before, len(tumor_ids))[inner]
    first_new_number = max((n for n in numbers if n is not None), default=0) + 1
    new_lesions = range(int(owners_after.max()) - len(tumor_ids))
    tumor_ids += [_add_segment(segmentation_node, TUMOR_SEGMENT, first_new_number + n) for n in new_lesions]
    for owner, segment_id in enumerate(tumor_ids, start=1):
        _replace_inside_box(segmentation_node, segment_id, owners_after == owner, volume_node, box,
                            owners_before[inner] == owner)


def tumor_owners(tumor: np.ndarray, owners_before: np.ndarray, owner_count: int) -> np.ndarray:
    """Which tumor segment each voxel belongs to after an edit: 0 for no tumor, n for the n-th
    tumor segment, and past ``owner_count`` for new segments.

    ``tumor`` (the tumor voxels after the edit) and ``owners_before`` (the segments before it,
    numbered the same way) cover the edited box and one voxel around it, where nothing changed.
    Each connected tumor (26-connected) goes to the segment that held most of its voxels before: a
    refined tumor keeps its segment and the voxels it gained join it, and tumors that grew into one
    join the larger. A tumor no segment held is a new lesion: it gets a new segment, numbered on
    from ``owner_count``.
    """
    import cc3d

    components = cc3d.connected_components(tumor, connectivity=26).astype(np.int64)
    before = owners_before.astype(np.int64)
    count, columns = int(components.max()), owner_count + 1
    overlap = np.bincount((components * columns + before).ravel(), minlength=(count + 1) * columns)
    overlap = overlap.reshape(count + 1, columns)
    overlap[:, 0] = 0
    owner_of = overlap.argmax(axis=1)
    new_lesions = np.flatnonzero(owner_of == 0)[1:]  # index 0 is the background
    owner_of[new_lesions] = owner_count + 1 + np.arange(len(new_lesions))
    owner_of[0] = 0
    return owner_of[components]


# --------------------------------------------------------------------------------------------
# Results


def measure(ct: sitk.Image, labels: np.ndarray) -> CaseReport:
    """The core's report for a label array on the CT's grid."""
    from LiverTumorDARNLib.report import measure as measure_case

    label_image = sitk.GetImageFromArray(labels.astype(np.uint8))
    label_image.CopyInformation(ct)
    return measure_case(ct, label_image)


def measure_segments(segmentation_node, volume_node) -> CaseReport:
    """The report of the module's segments as they are now (after any refinement or edit)."""
    return measure(image_from_volume(volume_node), labels_from_segments(segmentation_node, volume_node))


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


CENTROID_COLUMNS = ("Centroid R (mm)", "Centroid A (mm)", "Centroid S (mm)")


def tumor_centroid_in_view_row(table_node, view_row: int) -> tuple[float, float, float] | None:
    """The world RAS centroid of the tumor that a table view of ``table_node`` shows in ``view_row``;
    None for the row of column titles, or a row past the last.

    A table view shows the column titles as its first row unless the node uses them as the column
    header, so view row n is table row n - 1 (as ``qMRMLTableModel::mrmlTableRowIndex`` maps it).
    Newer Slicer calls the switch ``UseColumnTitleAsColumnHeader``, older ``UseColumnNameAsColumnHeader``.
    """
    titles_as_header = getattr(table_node, "GetUseColumnTitleAsColumnHeader", None) or table_node.GetUseColumnNameAsColumnHeader
    row = view_row if titles_as_header() else view_row - 1
    if not 0 <= row < table_node.GetNumberOfRows():
        return None
    titles = [name for name, _kind in RESULT_COLUMNS]
    return tuple(float(table_node.GetCellText(row, titles.index(name))) for name in CENTROID_COLUMNS)


def summary(report: CaseReport) -> str:
    """One line for the panel: liver volume, tumor count and volume, burden."""
    count = len(report.tumors)
    return (f"Liver {report.liver_volume_ml:.1f} mL; {count} tumor{'s' if count != 1 else ''}, "
            f"{report.tumor_volume_ml:.1f} mL; tumor burden {report.tumor_burden_percent:.2f} %")
