"""Outputs: .seg.nrrd and DICOM SEG read back by their own libraries, reports, format choice."""

from __future__ import annotations

import csv
import json

import highdicom
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import slicerio
from hypothesis import given, settings
from hypothesis import strategies as st

from dicom_series import write_series
from test_io import DICOM
from LiverTumorDARNLib.cli import main
from LiverTumorDARNLib.errors import InputError
from LiverTumorDARNLib.io import read_image, write_image
from LiverTumorDARNLib.labels import LIVER, SEGMENTS, TUMOR
from LiverTumorDARNLib.outputs import ijk_to_lps, output_format, write_dicom_seg, write_slicer_segmentation
from LiverTumorDARNLib.report import CaseReport, TumorMeasurement, write_report

FLIPPED = (-1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0)


def label_image(shape=(12, 20, 24), direction=FLIPPED) -> sitk.Image:
    """Liver block with one tumor inside, on an anisotropic, flipped, off-origin grid."""
    labels = np.zeros(shape, np.uint8)
    labels[2:10, 4:16, 5:20] = LIVER
    labels[4:7, 6:9, 8:12] = TUMOR
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((10.0, -20.0, 35.0))
    image.SetDirection(direction)
    return image


def ct_series(folder):
    hu = np.full((20, 40, 48), -1000.0)
    hu[:, 8:32, 8:40] = 60.0
    write_series(folder, hu)
    return folder


def test_slicer_segmentation_keeps_voxels_geometry_names_colours_and_codes(tmp_path):
    labels = label_image()
    path = write_slicer_segmentation(labels, tmp_path / "result.seg.nrrd")
    segmentation = slicerio.read_segmentation(str(path))
    np.testing.assert_allclose(segmentation["ijkToLPS"], ijk_to_lps(labels))
    voxels = sitk.GetArrayViewFromImage(labels)
    for expected in SEGMENTS:
        segment = slicerio.segment_from_name(segmentation, expected.name)
        mask = slicerio.extract_segments(segmentation, [(expected.name, 1)])["voxels"].transpose(2, 1, 0)
        np.testing.assert_array_equal(mask == 1, voxels == expected.label)
        assert segment["color"] == pytest.approx([c / 255 for c in expected.color], abs=1e-6)
        assert segment["terminology"]["type"] == [expected.type.scheme, expected.type.value, expected.type.meaning]
        assert segment["terminology"]["category"][1] == expected.category.value


def test_dicom_seg_references_each_source_slice_and_reads_back_equal(tmp_path):
    source = ct_series(tmp_path / "ct")
    ct = read_image(source)
    array = np.zeros(ct.GetSize()[::-1], np.uint8)
    array[3:15, 10:30, 10:38] = LIVER
    array[6:9, 15:20, 15:22] = TUMOR
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(ct)
    path = write_dicom_seg(labels, tmp_path / "seg.dcm", source)

    seg = highdicom.seg.segread(path)
    sources = sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in source.iterdir()),
                     key=lambda d: float(d.ImagePositionPatient[2]))
    pixels = seg.get_pixels_by_source_instance([d.SOPInstanceUID for d in sources], combine_segments=True)
    np.testing.assert_array_equal(pixels, array)
    described = {d.SegmentNumber: d for d in seg.SegmentSequence}
    for expected in SEGMENTS:
        assert described[expected.label].SegmentLabel == expected.name
        assert described[expected.label].SegmentedPropertyTypeCodeSequence[0].CodeValue == expected.type.value


def test_dicom_seg_needs_a_dicom_source(tmp_path):
    with pytest.raises(InputError, match="needs a DICOM series folder"):
        write_dicom_seg(label_image(), tmp_path / "seg.dcm", tmp_path / "ct.nii.gz")
    assert not (tmp_path / "seg.dcm").exists()


def test_dicom_seg_of_a_series_stripped_of_instance_uids_is_refused(tmp_path):
    source = ct_series(tmp_path / "ct")
    for path in source.iterdir():
        dataset = pydicom.dcmread(path)
        dataset.SOPInstanceUID = ""
        dataset.save_as(path)
    labels = sitk.Cast(read_image(source) * 0, sitk.sitkUInt8)
    with pytest.raises(InputError, match="no SOP Instance UIDs"):
        write_dicom_seg(labels, tmp_path / "seg.dcm", source)


@pytest.mark.parametrize("name, expected", [
    ("a.nii.gz", "nifti"), ("a.nii", "nifti"), ("a.nrrd", "nrrd"), ("a.seg.nrrd", "seg.nrrd"),
    ("a.mha", "mha"), ("a.dcm", "dicom-seg")])
def test_output_format_follows_the_file_name(tmp_path, name, expected):
    assert output_format(tmp_path / name) == expected


def test_output_name_without_a_known_suffix_is_refused(tmp_path):
    with pytest.raises(InputError, match="cannot tell the output format") as refusal:
        output_format(tmp_path / "labels.png")
    assert refusal.value.option == "format"


def small_report() -> CaseReport:
    tumor = TumorMeasurement(1, 2.5, 18.2, (1.0, -2.0, 30.5), (10, 11, 12), 45.0)
    return CaseReport(1500.0, 2.5, 0.167, [tumor], series_uid="1.2.3.4")


def test_csv_report_has_one_row_per_tumor_with_the_series_it_was_read_from(tmp_path):
    with open(write_report(small_report(), tmp_path / "report.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["volume_ml"] == "2.5" and rows[0]["centroid_k"] == "12"
    assert rows[0]["series_uid"] == "1.2.3.4"


def test_json_report_holds_the_case_and_its_tumors(tmp_path):
    data = json.loads(write_report(small_report(), tmp_path / "report.json").read_text())
    assert data["liver_volume_ml"] == 1500.0 and data["tumors"][0]["longest_axial_diameter_mm"] == 18.2


def test_segment_of_a_dicom_folder_writes_dicom_seg_and_a_report_naming_the_series(models_dir, tmp_path, capsys):
    source = ct_series(tmp_path / "ct")
    uid = pydicom.dcmread(next(source.iterdir())).SeriesInstanceUID
    assert main(["segment", str(source), "-o", str(tmp_path / "seg.dcm"), "--report", str(tmp_path / "r.json"),
                 "--models", str(models_dir)]) == 0
    assert highdicom.seg.segread(tmp_path / "seg.dcm").NumberOfFrames > 0
    assert json.loads((tmp_path / "r.json").read_text())["series_uid"] == uid
    assert f"DICOM series {uid}" in capsys.readouterr().out


def test_segment_of_a_volume_file_to_dicom_seg_is_one_line_and_writes_nothing(models_dir, ct_file, tmp_path, capsys):
    assert main(["segment", str(ct_file), "-o", str(tmp_path / "seg.dcm"), "--models", str(models_dir)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_real_siemens_series_segments_to_slicer_file_and_refuses_dicom_seg_early(models_dir, tmp_path, capsys):
    if not DICOM.is_dir():
        pytest.skip(f"real DICOM series not available at {DICOM}")
    assert main(["segment", str(DICOM), "-o", str(tmp_path / "s.seg.nrrd"), "--models", str(models_dir)]) == 0
    assert slicerio.read_segmentation(str(tmp_path / "s.seg.nrrd"))["voxels"].shape == (512, 512, 20)
    capsys.readouterr()
    assert main(["segment", str(DICOM), "-o", str(tmp_path / "s.dcm"), "--models", str(models_dir)]) == 2
    err = capsys.readouterr().err
    assert "no SOP Instance UIDs" in err and "stage" not in err  # refused before the networks ran


# --------------------------------------------------------------------------- round trips


axis_directions = st.permutations([0, 1, 2]).flatmap(
    lambda perm: st.tuples(*[st.sampled_from((1.0, -1.0))] * 3).map(
        lambda signs: tuple(float(signs[c]) if perm[c] == r else 0.0 for r in range(3) for c in range(3))))
spacings = st.tuples(*[st.sampled_from((0.5, 0.75, 1.25, 2.5, 5.0))] * 3)
shapes = st.tuples(st.integers(1, 6), st.integers(1, 7), st.integers(1, 8))


@settings(max_examples=25, deadline=None)
@given(shape=shapes, spacing=spacings, direction=axis_directions, suffix=st.sampled_from((".nii.gz", ".nrrd", ".mha")),
       seed=st.integers(0, 2**16))
def test_label_map_round_trips_through_every_format(tmp_path_factory, shape, spacing, direction, suffix, seed):
    labels = sitk.GetImageFromArray(np.random.default_rng(seed).integers(0, 3, shape, dtype=np.uint8))
    labels.SetSpacing(spacing)
    labels.SetDirection(direction)
    labels.SetOrigin((-7.5, 12.25, 3.0))
    back = read_image(write_image(labels, tmp_path_factory.mktemp("rt") / f"labels{suffix}"))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(labels))
    assert back.GetSpacing() == pytest.approx(spacing) and back.GetDirection() == pytest.approx(direction)
    assert back.GetOrigin() == pytest.approx(labels.GetOrigin())


@settings(max_examples=15, deadline=None)
@given(shape=shapes, spacing=spacings, direction=axis_directions, seed=st.integers(0, 2**16))
def test_slicer_segmentation_round_trips_every_label(tmp_path_factory, shape, spacing, direction, seed):
    labels = sitk.GetImageFromArray(np.random.default_rng(seed).integers(0, 3, shape, dtype=np.uint8))
    labels.SetSpacing(spacing)
    labels.SetDirection(direction)
    path = write_slicer_segmentation(labels, tmp_path_factory.mktemp("seg") / "labels.seg.nrrd")
    segmentation = slicerio.read_segmentation(str(path))
    np.testing.assert_allclose(segmentation["ijkToLPS"], ijk_to_lps(labels))
    merged = slicerio.extract_segments(segmentation, [(s.name, s.label) for s in SEGMENTS])["voxels"]
    np.testing.assert_array_equal(merged.transpose(2, 1, 0), sitk.GetArrayViewFromImage(labels))
