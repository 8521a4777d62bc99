"""DICOM folders in: choosing the CT series, stacking slices by position, HU, unsound geometry."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicom_series import write_series
from LiverTumorDARNLib.errors import InputError
from LiverTumorDARNLib.io import read_ct, read_image, source_series_uid


def marked_hu(shape=(20, 40, 48)) -> np.ndarray:
    """Air outside a soft-tissue block, and one bright voxel at [z, y, x] = (13, 9, 30)."""
    hu = np.full(shape, -1000.0)
    hu[:, 8:32, 8:40] = 50.0
    hu[13, 9, 30] = 900.0
    return hu


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_slices_are_stacked_by_position_not_by_file_name(tmp_path):
    write_series(tmp_path, marked_hu(), file_order="shuffled")
    image = read_image(tmp_path)
    voxels = sitk.GetArrayViewFromImage(image)
    assert tuple(np.argwhere(voxels == voxels.max())[0]) == (13, 9, 30)


def test_marked_voxel_lies_at_its_dicom_position(tmp_path):
    write_series(tmp_path, marked_hu(), spacing=(0.8, 0.7, 2.5), origin=(-100.0, -80.0, 50.0))
    point = read_image(tmp_path).TransformIndexToPhysicalPoint((30, 9, 13))
    assert point == pytest.approx((-100.0 + 30 * 0.8, -80.0 + 9 * 0.7, 50.0 + 13 * 2.5))


def test_rescale_slope_and_intercept_give_hounsfield_units(tmp_path):
    write_series(tmp_path, marked_hu(), slope=0.5, intercept=-1024.0)
    voxels = sitk.GetArrayViewFromImage(read_ct(tmp_path))
    assert voxels.min() == -1000.0 and voxels.max() == 900.0 and voxels[0, 20, 20] == 50.0


def test_axial_ct_series_is_chosen_over_localizer_reformat_and_other_modalities(tmp_path):
    hu = marked_hu()
    write_series(tmp_path, hu[:1].repeat(3, 0), image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), description="Topogram")
    write_series(tmp_path, hu[:, :30], orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0), description="Coronal MPR")
    write_series(tmp_path, hu.repeat(2, 0), modality="PT", description="PET AC")
    axial = write_series(tmp_path, hu, description="Abdomen 2.5 mm")
    assert read_image(tmp_path).GetSize() == (48, 40, 20)
    assert axial in one_line_error(read_image, tmp_path, series_uid="1.2.3.4")


def test_series_uid_chooses_a_series_explicitly(tmp_path):
    hu = marked_hu()
    write_series(tmp_path, hu, description="thin")
    thick = write_series(tmp_path, hu[::2], spacing=(0.8, 0.8, 5.0), description="thick")
    assert read_image(tmp_path, series_uid=thick).GetSize() == (48, 40, 10)


def test_unknown_series_uid_names_the_series_there_are(tmp_path):
    uid = write_series(tmp_path, marked_hu(), description="Abdomen 2.5 mm")
    message = one_line_error(read_image, tmp_path, series_uid="1.2.3.4")
    assert "1.2.3.4" in message and uid in message and "Abdomen 2.5 mm" in message


def test_folder_without_ct_series_asks_for_series_uid(tmp_path):
    write_series(tmp_path, marked_hu(), modality="MR")
    with pytest.raises(InputError, match="choose one by its series UID") as refusal:
        read_image(tmp_path)
    assert refusal.value.option == "series_uid"


def test_missing_slice_is_reported_with_its_gap(tmp_path):
    write_series(tmp_path, marked_hu(), spacing=(0.8, 0.8, 2.5), skip_slices=(7,))
    message = one_line_error(read_image, tmp_path)
    assert "uneven slice spacing: 5.00 mm" in message and "2.50 mm" in message


def test_gantry_tilt_is_reported_with_its_angle(tmp_path):
    write_series(tmp_path, marked_hu(), tilt_degrees=15.0)
    assert "gantry tilt of 15.0 degrees" in one_line_error(read_image, tmp_path)


def test_two_acquisitions_in_one_series_are_reported(tmp_path):
    hu = marked_hu()
    uid = write_series(tmp_path, hu)
    write_series(tmp_path, hu, series_uid=uid, prefix="SECOND")
    assert "slices at one position" in one_line_error(read_image, tmp_path)


def edit_slice(path: Path, change) -> None:
    dataset = pydicom.dcmread(path)
    change(dataset)
    dataset.save_as(path)


def slice_files(folder: Path) -> list[Path]:
    """The files in stacking order (file_order="sorted" names them by position)."""
    return sorted(folder.iterdir())


def test_the_image_keeps_the_uid_of_the_series_it_was_read_from(tmp_path):
    uid = write_series(tmp_path, marked_hu())
    assert source_series_uid(read_image(tmp_path)) == uid


def test_two_ct_series_with_as_many_slices_are_refused_with_both_named(tmp_path):
    arterial = write_series(tmp_path, marked_hu(), description="arterial")
    venous = write_series(tmp_path, marked_hu(), description="venous", prefix="V")
    message = one_line_error(read_image, tmp_path)
    assert "2 axial CT series have 20 slices each" in message and "choose one by its series UID" in message
    assert arterial in message and venous in message
    assert read_image(tmp_path, series_uid=venous).GetSize() == (48, 40, 20)


def test_a_slice_without_its_position_is_named(tmp_path):
    write_series(tmp_path, marked_hu(), file_order="sorted")
    edit_slice(slice_files(tmp_path)[4], lambda slice_: delattr(slice_, "ImagePositionPatient"))
    assert "IM0004.dcm: the slice has no valid ImagePositionPatient" in one_line_error(read_image, tmp_path)


def test_a_pixel_spacing_of_zero_is_refused_not_read_as_1_mm(tmp_path):
    write_series(tmp_path, marked_hu())
    for path in slice_files(tmp_path):
        edit_slice(path, lambda slice_: setattr(slice_, "PixelSpacing", [0, 0]))
    assert "PixelSpacing 0\\0 mm is not a pixel size" in one_line_error(read_image, tmp_path)


def test_a_slice_of_another_size_is_named(tmp_path):
    write_series(tmp_path, marked_hu(), file_order="sorted")

    def shrink(slice_):
        slice_.Rows, slice_.Columns = 32, 32
        slice_.PixelData = np.zeros((32, 32), "<i2").tobytes()

    edit_slice(slice_files(tmp_path)[5], shrink)
    assert "mixes image sizes: IM0005.dcm is 32x32 where 19 slices are 48x40" in one_line_error(read_image, tmp_path)


@pytest.mark.parametrize("position, content", [(9, "cut off"), (0, "empty")])
def test_a_slice_file_cut_off_or_empty_is_named_not_taken_for_a_gap_or_left_out(tmp_path, position, content):
    """GDCM leaves such a file out without a word: a gap in the middle, one slice fewer at an end."""
    write_series(tmp_path, marked_hu(), file_order="sorted")
    path = slice_files(tmp_path)[position]
    path.write_bytes(path.read_bytes()[:1000] if content == "cut off" else b"")
    message = one_line_error(read_image, tmp_path)
    assert message.startswith(f"{tmp_path}: {path.name} ")
    assert ("is empty (0 bytes)" if content == "empty" else "cannot be read as a slice") in message


def test_files_that_are_no_slices_beside_the_series_are_ignored(tmp_path):
    write_series(tmp_path, marked_hu())
    (tmp_path / "README.txt").write_text("exported from the PACS")
    (tmp_path / ".DS_Store").write_bytes(b"")
    assert read_image(tmp_path).GetSize() == (48, 40, 20)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_pipe_in_the_series_folder_is_refused_before_gdcm_opens_it(tmp_path):
    write_series(tmp_path, marked_hu())
    os.mkfifo(tmp_path / "pipe.dcm")
    assert "pipe.dcm is not a regular file" in one_line_error(read_image, tmp_path)
