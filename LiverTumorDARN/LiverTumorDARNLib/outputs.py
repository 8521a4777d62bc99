"""The segmentation written in the format the next program wants, each file written atomically.

* a label map (NIfTI, NRRD, MHA): 0 background, 1 liver, 2 tumor, for research pipelines;
* Slicer's ``.seg.nrrd`` (written by ``slicerio``): named, coloured, coded segments that open in
  3D Slicer's Segment Editor as if Slicer had made them;
* DICOM SEG (written by ``highdicom``): for PACS and viewers; it references the source series'
  instances, so it can only be made from a DICOM input, and its segments carry the codes of
  :data:`.labels.SEGMENTS`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import __version__
from .errors import InputError
from .io import WRITE_SUFFIXES, atomic_write, write_image
from .labels import SEGMENTS, Code

FORMATS = {"nifti": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha", "seg.nrrd": ".seg.nrrd", "dicom-seg": ".dcm"}
"""Output formats by name, each with the suffix it gets in an output folder."""

SLICER_TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
SLICER_ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


def output_format(path: Path, requested: str | None = None) -> str:
    """The format to write ``path`` in: ``requested``, else the one its suffix names."""
    if requested is not None:
        return requested
    name = path.name.lower()
    found = [fmt for fmt, suffix in FORMATS.items() if name.endswith(suffix)]
    found += ["nifti"] if name.endswith(".nii") else []
    if not found:
        raise InputError(f"{path}: cannot tell the output format from the name; end it in one of "
                         f"{', '.join(sorted(set(FORMATS.values()) | set(WRITE_SUFFIXES)))} or name the format", option="format")
    return max(found, key=lambda fmt: len(FORMATS[fmt]))  # .seg.nrrd before .nrrd


def check_source_fits(fmt: str, source: Path, target: Path, series_uid: str | None = None) -> None:
    """Fail before the work, not after it, when ``fmt`` cannot be made from ``source``."""
    if fmt != "dicom-seg":
        return
    import pydicom

    from . import dicom

    _require_dicom_folder(source, target)
    series = dicom.choose_series(source, dicom.list_series(source), series_uid)
    _require_instance_uids([pydicom.dcmread(series.files[0], stop_before_pixels=True)], source)


def _require_dicom_folder(source: Path, target: Path) -> None:
    if not Path(source).is_dir():
        raise InputError(f"{target}: DICOM SEG output needs a DICOM series folder as input "
                         f"(it references the source images); write .seg.nrrd or .nii.gz instead")


def _require_instance_uids(datasets: list, source: Path) -> None:
    if not all(d.get("SOPInstanceUID") and d.get("SOPClassUID") for d in datasets):
        raise InputError(f"{source}: the series has no SOP Instance UIDs (stripped by anonymisation?), which a "
                         f"DICOM SEG must reference; write .seg.nrrd or .nii.gz instead")


def write_segmentation(labels: sitk.Image, path: Path, fmt: str, source: Path,
                       series_uid: str | None = None, overwrite: bool = False) -> Path:
    """Write a label map on the input's grid as ``fmt``; DICOM SEG needs the ``source`` DICOM folder."""
    if fmt == "seg.nrrd":
        return write_slicer_segmentation(labels, path, overwrite)
    if fmt == "dicom-seg":
        return write_dicom_seg(labels, path, source, series_uid, overwrite)
    return write_image(labels, path, overwrite)


# --------------------------------------------------------------------------- Slicer .seg.nrrd


def write_slicer_segmentation(labels: sitk.Image, path: Path, overwrite: bool = False) -> Path:
    """Write a ``.seg.nrrd`` whose segments keep the label values, names, colours and codes."""
    import slicerio

    voxels = sitk.GetArrayViewFromImage(labels).transpose(2, 1, 0)  # [z, y, x] -> [i, j, k]
    segmentation = slicerio.create_segmentation(voxels.shape, ijk_to_lps(labels))
    for segment in SEGMENTS:
        slicerio.add_segment(segmentation, voxels == segment.label, {
            "id": segment.name.replace(" ", "_"), "name": segment.name,
            "color": [c / 255 for c in segment.color], "terminology": _slicer_terminology(segment)})

    def problem(written: Path) -> str | None:
        back = slicerio.read_segmentation(str(written))["voxels"]
        return None if np.array_equal(back, segmentation["voxels"]) else "the file read back holds other voxels than were written"

    return atomic_write(Path(path), ".seg.nrrd", overwrite,
                        lambda temp: slicerio.write_segmentation(str(temp), segmentation), problem)


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    """The 4x4 matrix from voxel index (i, j, k) to physical LPS millimetres."""
    matrix = np.eye(4)
    matrix[:3, :3] = np.reshape(image.GetDirection(), (3, 3)) * np.array(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def _slicer_terminology(segment) -> dict:
    def triple(code: Code | None) -> list[str]:
        return [code.scheme, code.value, code.meaning] if code else ["", "", ""]

    return {"contextName": SLICER_TERMINOLOGY_CONTEXT, "category": triple(segment.category),
            "type": triple(segment.type), "anatomicContextName": SLICER_ANATOMIC_CONTEXT,
            "anatomicRegion": triple(segment.anatomic_region)}


# --------------------------------------------------------------------------- DICOM SEG


def write_dicom_seg(labels: sitk.Image, path: Path, source: Path, series_uid: str | None = None,
                    overwrite: bool = False) -> Path:
    """Write a DICOM SEG that references the source series' instances slice by slice.

    ``labels`` must lie on the grid the series was read onto: slice k of its array is the k-th
    file in stacking order (:func:`.dicom.sorted_checked_files`).
    """
    import highdicom
    import pydicom

    from . import dicom

    _require_dicom_folder(source, path)  # the instance UIDs are checked below, on every slice
    series = dicom.choose_series(source, dicom.list_series(source), series_uid)
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in dicom.sorted_checked_files(source, series)]
    _require_instance_uids(datasets, source)
    array = sitk.GetArrayFromImage(labels)
    if array.shape != (len(datasets), datasets[0].Rows, datasets[0].Columns):
        raise ValueError(f"labels of shape {array.shape} are not on the grid of series {series.uid}")
    seg = highdicom.seg.Segmentation(
        source_images=datasets, pixel_array=array,
        segmentation_type=highdicom.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(highdicom),
        series_instance_uid=highdicom.UID(), series_number=9901, series_description="LiverTumorDARN",
        sop_instance_uid=highdicom.UID(), instance_number=1, manufacturer="LiverTumorDARN",
        manufacturer_model_name="DARN cascade", software_versions=__version__, device_serial_number="none",
        omit_empty_frames=False)

    def problem(written: Path) -> str | None:
        back = pydicom.dcmread(written)
        return None if back.get("PixelData") == seg.PixelData else "the file read back lacks the segments' pixels"

    return atomic_write(Path(path), Path(path).suffix, overwrite, lambda temp: seg.save_as(temp), problem)


def _segment_descriptions(highdicom) -> list:
    from pydicom.sr.codedict import codes

    def coded(code: Code):
        return highdicom.sr.CodedConcept(code.value, code.scheme, code.meaning)

    algorithm = highdicom.AlgorithmIdentificationSequence(
        name="LiverTumorDARN", version=__version__, family=codes.cid7162.ArtificialIntelligence)
    return [highdicom.seg.SegmentDescription(
        segment_number=segment.label, segment_label=segment.name,
        segmented_property_category=coded(segment.category), segmented_property_type=coded(segment.type),
        algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
        anatomic_regions=[coded(segment.anatomic_region)] if segment.anatomic_region else None)
        for segment in SEGMENTS]
