"""Writes small CT DICOM series for the tests, with the quirks scanners produce on demand.

Every attribute a CT image and a DICOM SEG referencing it need is set; the quirks (rescale,
gantry tilt, a missing slice, shuffled file names, a localizer) are arguments, so each test states
which one it exercises.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

AS_DICOM_FILE = ({"enforce_file_format": True} if int(pydicom.__version__.split(".")[0]) >= 3
                 else {"write_like_original": False})
"""Write a proper DICOM file (preamble, file meta): pydicom 3's name, and pydicom 2's (Python 3.9)."""

STUDY_UID = generate_uid()
FRAME_OF_REFERENCE_UID = generate_uid()


def write_series(folder: Path, hu: np.ndarray, *, spacing=(0.8, 0.8, 2.5), origin=(-100.0, -80.0, 50.0),
                 slope: float = 1.0, intercept: float = -1024.0, tilt_degrees: float = 0.0,
                 skip_slices: tuple[int, ...] = (), modality: str = "CT",
                 image_type=("ORIGINAL", "PRIMARY", "AXIAL"), description: str = "Abdomen 2.5 mm",
                 orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), series_uid: str | None = None,
                 file_order: str = "shuffled", prefix: str = "IM") -> str:
    """Write ``hu`` ([z, y, x], Hounsfield units) as one series in ``folder``; returns its UID.

    Slice k lies at ``origin + k * spacing_z`` along the slice normal, shifted along the column
    direction by ``tan(tilt) * k * spacing_z`` when the gantry is tilted. ``skip_slices`` leaves
    those slices out (a gap in the stack). File names are shuffled by default, so a reader that
    trusts the names instead of the positions gets the slices out of order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    row, column = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, column)
    stored = np.round((hu - intercept) / slope).astype(np.int16)
    keep = [k for k in range(hu.shape[0]) if k not in skip_slices]
    names = np.random.default_rng(0).permutation(len(keep)) if file_order == "shuffled" else range(len(keep))
    if series_uid is None:
        series_uid = generate_uid()
    for number, (k, name) in enumerate(zip(keep, names), start=1):
        position = (np.array(origin) + normal * k * spacing[2]
                    + column * np.tan(np.radians(tilt_degrees)) * k * spacing[2])
        dataset = _ct_slice(stored[k], spacing, position, orientation, slope, intercept, modality,
                            image_type, description, series_uid, number, tilt_degrees)
        dataset.save_as(folder / f"{prefix}{name:04d}.dcm", **AS_DICOM_FILE)
    return series_uid


def _ct_slice(pixels, spacing, position, orientation, slope, intercept, modality, image_type,
              description, series_uid, number, tilt_degrees) -> pydicom.Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Test", "PHANTOM-1", "", "O"
    ds.StudyInstanceUID, ds.StudyID, ds.StudyDate, ds.StudyTime = STUDY_UID, "1", "20261123", "120000"
    ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, 2, description
    ds.Modality, ds.Manufacturer, ds.ImageType = modality, "LiverTumorDARN tests", list(image_type)
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = FRAME_OF_REFERENCE_UID, ""
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [spacing[1], spacing[0]]  # row spacing (y), column spacing (x)
    ds.SliceThickness = spacing[2]
    ds.GantryDetectorTilt = tilt_degrees
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "HU"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    return ds
