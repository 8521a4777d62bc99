"""DICOM folders in: choosing the CT series, stacking slices by position, HU, unsound geometry."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from dicom_series import write_series
from LiverTumorDARNLib.errors import InputError
from LiverTumorDARNLib.io import read_ct, read_image


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
