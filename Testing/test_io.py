"""Tests of LiverTumorDARNLib.io: reading, CT checks, canonical orientation, atomic writing."""

from __future__ import annotations

import itertools
import json
import os
import struct
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from adversity import file_size_limit, release_readers
from LiverTumorDARNLib import io
from LiverTumorDARNLib.errors import InputError
from LiverTumorDARNLib.outputs import write_slicer_segmentation

REALCT = Path(__file__).resolve().parents[1].parent / "shared" / "realct"
LITS = REALCT / "lits-volume-0"
DICOM = REALCT / "siemens-dicom-20"
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


# --------------------------------------------------------------------------- fixtures


def ct_like(size_xyz=(40, 36, 20), seed=0) -> sitk.Image:
    """Small int16 volume that passes check_ct: air border, soft tissue inside, some noise."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = size_xyz
    array = np.full((nz, ny, nx), -1000, np.int16)
    array[:, ny // 4 : -ny // 4, nx // 4 : -nx // 4] = 40
    array += rng.integers(-20, 20, array.shape, dtype=np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.75, 0.875, 2.5))  # float32-exact: NIfTI stores geometry as float32
    image.SetOrigin((-12.5, 30.25, 100.0))
    return image


def assert_same_image(actual: sitk.Image, expected: sitk.Image) -> None:
    """Same voxels, pixel type and geometry, bit-for-bit."""
    assert actual.GetPixelID() == expected.GetPixelID()
    assert actual.GetSize() == expected.GetSize()
    assert actual.GetSpacing() == expected.GetSpacing()
    assert actual.GetOrigin() == expected.GetOrigin()
    assert actual.GetDirection() == expected.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(actual), sitk.GetArrayViewFromImage(expected))


def axis_aligned_directions() -> list:
    """All 48 axis-aligned direction matrices: 6 permutations x 8 sign patterns."""
    params = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            matrix = np.zeros((3, 3))
            for column, (row, sign) in enumerate(zip(perm, signs)):
                matrix[row, column] = sign
            name = f"perm{''.join(map(str, perm))}-signs{''.join('+-'[s < 0] for s in signs)}"
            params.append(pytest.param(tuple(matrix.ravel()), id=name))
    return params


def marked_volume(direction) -> tuple[sitk.Image, tuple[int, int, int]]:
    """Anisotropic, off-origin volume with one marked voxel (its index returned, x, y, z order)."""
    array = np.zeros((5, 6, 7), np.int16)
    marked = (5, 1, 3)  # x, y, z: away from every centre, so any flip moves it
    array[marked[2], marked[1], marked[0]] = 1000
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 1.3, 3.1))
    image.SetOrigin((-17.0, 42.5, 8.25))
    image.SetDirection(direction)
    return image, marked


@pytest.fixture(scope="module")
def lits_ct() -> sitk.Image:
    path = LITS / "ct.nii.gz"
    if not path.exists():
        pytest.skip(f"real CT not available at {path}")
    return io.read_ct(path)


@pytest.fixture
def dicom_folder() -> Path:
    if not DICOM.is_dir():
        pytest.skip(f"real DICOM series not available at {DICOM}")
    return DICOM


def assert_one_line_input_error(call, *args, match: str = "") -> InputError:
    with pytest.raises(InputError, match=match) as info:
        call(*args)
    assert "\n" not in str(info.value)
    return info.value


# --------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("direction", axis_aligned_directions())
def test_to_canonical_gives_identity_direction_and_keeps_world_position_of_voxels(direction):
    image, marked = marked_volume(direction)
    point = image.TransformIndexToPhysicalPoint(marked)

    canonical = io.to_canonical(image)

    assert canonical.GetDirection() == pytest.approx(IDENTITY)
    z, y, x = np.argwhere(sitk.GetArrayViewFromImage(canonical) == 1000)[0]
    assert canonical.TransformIndexToPhysicalPoint((int(x), int(y), int(z))) == pytest.approx(point)


@pytest.mark.parametrize("direction", axis_aligned_directions())
def test_from_canonical_restores_original_array_and_geometry_exactly(direction):
    image, _ = marked_volume(direction)
    assert_same_image(io.from_canonical(io.to_canonical(image), image), image)


@pytest.mark.parametrize("direction", axis_aligned_directions())
def test_array_to_reference_places_canonical_array_on_reference_grid(direction):
    image, _ = marked_volume(direction)
    canonical_array = sitk.GetArrayFromImage(io.to_canonical(image))
    assert_same_image(io.array_to_reference(canonical_array, image), image)


def test_array_to_reference_stores_boolean_mask_as_uint8():
    image, _ = marked_volume(IDENTITY)
    mask = sitk.GetArrayViewFromImage(image) > 0
    result = io.array_to_reference(mask, image)
    assert result.GetPixelID() == sitk.sitkUInt8
    assert int(sitk.GetArrayViewFromImage(result).sum()) == 1


def test_oblique_image_keeps_residual_rotation_and_round_trips_exactly():
    image, _ = marked_volume(IDENTITY)
    angle = np.deg2rad(10.0)  # rotated about z, the nearest code is still LPS after swapping x/y
    c, s = np.cos(angle), np.sin(angle)
    image.SetDirection((s, c, 0.0, -c, s, 0.0, 0.0, 0.0, 1.0))
    canonical = io.to_canonical(image)
    assert canonical.GetDirection() != pytest.approx(IDENTITY)
    assert np.abs(np.diag(np.reshape(canonical.GetDirection(), (3, 3)))).min() > 0.9
    assert_same_image(io.from_canonical(canonical, image), image)


def test_from_canonical_rejects_image_from_another_grid():
    image, _ = marked_volume(IDENTITY)
    with pytest.raises(ValueError, match="canonical grid"):
        io.from_canonical(ct_like(), image)


# --------------------------------------------------------------------------- real data


def test_real_lits_ct_becomes_identity_direction_in_canonical_form(lits_ct):
    assert lits_ct.GetDirection() == pytest.approx((1, 0, 0, 0, -1, 0, 0, 0, -1))
    assert io.to_canonical(lits_ct).GetDirection() == pytest.approx(IDENTITY)


def test_real_lits_ct_round_trips_exactly_through_canonical_form(lits_ct):
    assert_same_image(io.from_canonical(io.to_canonical(lits_ct), lits_ct), lits_ct)


def test_real_lits_liver_mask_lines_up_with_ct_in_canonical_form(lits_ct):
    liver = io.read_image(LITS / "liver.nii.gz")
    canonical_ct, canonical_liver = io.to_canonical(lits_ct), io.to_canonical(liver)
    assert canonical_liver.GetSize() == canonical_ct.GetSize()
    assert canonical_liver.GetOrigin() == pytest.approx(canonical_ct.GetOrigin())
    inside = sitk.GetArrayViewFromImage(canonical_ct)[sitk.GetArrayViewFromImage(canonical_liver) > 0]
    assert 60 < float(np.median(inside)) < 200  # liver parenchyma in contrast CT, not air or bone


def test_real_dicom_series_reads_as_plausible_ct_volume(dicom_folder):
    image = io.read_image(dicom_folder)
    assert image.GetSize() == (512, 512, 20)
    assert image.GetSpacing() == pytest.approx((0.977, 0.977, 2.0), abs=1e-3)
    assert float(sitk.GetArrayViewFromImage(image).min()) <= -900
    io.check_ct(image, str(dicom_folder))


# --------------------------------------------------------------------------- file round trips


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_write_then_read_reproduces_image_exactly(tmp_path, suffix):
    image = ct_like()
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, -1.0))
    written = io.write_image(image, tmp_path / f"ct{suffix}")
    assert written == tmp_path / f"ct{suffix}"
    assert_same_image(io.read_image(written), image)


def test_folder_without_dicom_reads_its_single_image_file(tmp_path):
    image = ct_like()
    io.write_image(image, tmp_path / "only.nrrd")
    assert_same_image(io.read_image(tmp_path), image)


@pytest.mark.parametrize(
    "name, expected",
    [("a.nii.gz", True), ("A.NII", True), ("b.nrrd", True), ("c.mhd", True), ("d.dcm", False), ("nii.gz.txt", False)],
)
def test_is_image_path_recognises_supported_suffixes(name, expected):
    assert io.is_image_path(name) is expected


# --------------------------------------------------------------------------- bad input


def test_missing_path_is_input_error(tmp_path):
    assert_one_line_input_error(io.read_image, tmp_path / "nope.nii.gz", match="no such file")


def test_empty_folder_is_input_error(tmp_path):
    assert_one_line_input_error(io.read_image, tmp_path, match="no DICOM series")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_truncated_file_is_input_error(tmp_path, suffix):
    path = tmp_path / f"ct{suffix}"
    io.write_image(ct_like(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_one_line_input_error(io.read_image, path, match=str(path))


def test_text_file_named_nrrd_is_input_error(tmp_path):
    path = tmp_path / "fake.nrrd"
    path.write_text("this is not an image\n")
    assert_one_line_input_error(io.read_image, path, match="cannot read")


def test_unsupported_suffix_is_input_error(tmp_path):
    path = tmp_path / "slice.dcm"
    path.write_bytes(b"\0" * 200)
    assert_one_line_input_error(io.read_image, path, match="DICOM series")


def test_2d_image_is_input_error(tmp_path):
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.Image(64, 64, sitk.sitkInt16), str(path))
    assert_one_line_input_error(io.read_image, path, match="2D")


def test_4d_image_is_input_error(tmp_path):
    path = tmp_path / "series.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([ct_like(), ct_like(seed=1)]), str(path))
    assert_one_line_input_error(io.read_image, path, match="4D")


def test_rgb_image_is_input_error(tmp_path):
    path = tmp_path / "colour.mha"
    sitk.WriteImage(sitk.Image([40, 36, 20], sitk.sitkVectorUInt8, 3), str(path))
    assert_one_line_input_error(io.read_image, path, match="scalar")


def test_nan_voxels_are_input_error():
    array = sitk.GetArrayFromImage(ct_like()).astype(np.float32)
    array[3, 4, 5] = np.nan
    assert_one_line_input_error(io.check_ct, sitk.GetImageFromArray(array), "nan.nii", match="NaN")


def test_mr_like_volume_without_air_is_input_error():
    rng = np.random.default_rng(0)
    mr = sitk.GetImageFromArray(rng.integers(0, 1000, (20, 36, 40)).astype(np.int16))
    assert_one_line_input_error(io.check_ct, mr, "mr.nii", match="Hounsfield")


def test_values_beyond_16_bit_range_are_input_error():
    array = sitk.GetArrayFromImage(ct_like()).astype(np.float32)
    array[0, 0, 0] = 70000.0
    assert_one_line_input_error(io.check_ct, sitk.GetImageFromArray(array), match="16-bit")


def test_volume_with_8_slices_is_input_error():
    assert_one_line_input_error(io.check_ct, ct_like((40, 36, 8)), "thin.nii", match="too small")


def test_ct_with_outside_field_of_view_value_is_accepted():
    array = sitk.GetArrayFromImage(ct_like())
    array[:, :3, :] = -3024
    io.check_ct(sitk.GetImageFromArray(array))


def test_read_ct_rejects_mr_file_naming_the_path(tmp_path):
    path = tmp_path / "mr.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((20, 36, 40), 300, np.int16)), str(path))
    error = assert_one_line_input_error(io.read_ct, path, match="Hounsfield")
    assert str(path) in str(error)


def nifti_with_pixdim(tmp_path: Path, axis: int, value: float) -> Path:
    """An uncompressed NIfTI whose header gives ``value`` as the voxel size along ``axis`` (1-3)."""
    path = tmp_path / "ct.nii"
    io.write_image(ct_like(), path)
    data = bytearray(path.read_bytes())
    struct.pack_into("<f", data, 76 + 4 * axis, value)  # pixdim[axis] of a little-endian NIfTI-1 header
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("value", [0.0, -2.5])
def test_a_nifti_voxel_size_of_zero_or_below_is_refused_not_read_as_1_mm(tmp_path, value):
    path = nifti_with_pixdim(tmp_path, 3, value)
    assert_one_line_input_error(io.read_image, path, match="voxel size of 0.75 x 0.875 x")


def test_nan_voxels_of_a_nifti_file_are_refused_though_itk_reads_them_as_0(tmp_path):
    array = sitk.GetArrayFromImage(ct_like()).astype(np.float32)
    array[3, 4, 5] = np.nan
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    assert_one_line_input_error(io.read_ct, path, match="1 voxel\\(s\\) are NaN")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_a_volume_of_nan_only_is_called_empty_not_an_mr(tmp_path, suffix):
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((20, 36, 40), np.nan, np.float32)), str(path))
    assert_one_line_input_error(io.read_ct, path, match="every voxel is NaN or infinite: the file holds no image")


def test_an_uncompressed_nifti_named_nii_gz_is_told_to_be_renamed(tmp_path):
    path = tmp_path / "ct.nii.gz"
    io.write_image(ct_like(), tmp_path / "ct.nii")
    (tmp_path / "ct.nii").rename(path)
    assert_one_line_input_error(io.read_image, path, match="uncompressed NIfTI .* rename it to .nii")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_pipe_named_like_a_volume_is_refused_without_being_opened(tmp_path):
    pipe = tmp_path / "ct.nii.gz"
    os.mkfifo(pipe)
    stop = release_readers(pipe)
    try:
        assert_one_line_input_error(io.read_image, pipe, match="not a regular file")
    finally:
        stop.set()


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_a_device_named_like_a_volume_is_refused(tmp_path):
    (tmp_path / "ct.nii").symlink_to("/dev/zero")
    assert_one_line_input_error(io.read_image, tmp_path / "ct.nii", match="not a regular file")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_a_file_the_user_may_not_read_says_so(tmp_path):
    path = tmp_path / "ct.nrrd"
    io.write_image(ct_like(), path)
    path.chmod(0)
    assert_one_line_input_error(io.read_image, path, match="Permission denied")


# --------------------------------------------------------------------------- outputs apart from inputs


def test_an_output_that_is_an_input_is_refused_by_path_link_or_hard_link(tmp_path):
    ct = tmp_path / "ct.nii.gz"
    io.write_image(ct_like(), ct)
    (tmp_path / "link.nii.gz").symlink_to(ct)
    os.link(ct, tmp_path / "hard.nii.gz")
    for output in (ct, tmp_path / "sub" / ".." / "ct.nii.gz", tmp_path / "link.nii.gz", tmp_path / "hard.nii.gz"):
        assert_one_line_input_error(io.check_outputs_apart, [output], [ct], match="an input is never replaced")


def test_an_output_in_a_folder_read_as_one_scan_is_refused(tmp_path):
    assert_one_line_input_error(io.check_outputs_apart, [tmp_path / "labels.nii.gz"], [tmp_path],
                                match="lies in the input folder")
    io.check_outputs_apart([tmp_path / "out" / "labels.nii.gz"], [tmp_path])  # a subfolder is not read


# --------------------------------------------------------------------------- atomic writing


def test_write_image_refuses_existing_file_and_keeps_its_bytes(tmp_path):
    path = tmp_path / "out.nii.gz"
    path.write_bytes(b"precious")
    assert_one_line_input_error(io.write_image, ct_like(), path, match="already exists")
    assert path.read_bytes() == b"precious"


def test_write_image_with_overwrite_replaces_existing_file(tmp_path):
    path = tmp_path / "out.nrrd"
    path.write_bytes(b"old")
    io.write_image(ct_like(), path, overwrite=True)
    assert_same_image(io.read_image(path), ct_like())


def test_write_image_creates_missing_parent_folders(tmp_path):
    path = io.write_image(ct_like(), tmp_path / "a" / "b" / "out.mha")
    assert path.is_file()


def test_write_image_under_a_file_is_input_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    assert_one_line_input_error(io.write_image, ct_like(), tmp_path / "afile" / "out.nii.gz", match="cannot create")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_write_image_into_read_only_folder_is_input_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert_one_line_input_error(io.write_image, ct_like(), folder / "out.nii.gz", match="cannot write")
    finally:
        folder.chmod(0o700)


def test_write_image_refuses_detached_header_format(tmp_path):
    assert_one_line_input_error(io.write_image, ct_like(), tmp_path / "out.mhd", match="cannot write this format")


def test_failed_write_leaves_no_temp_file_and_no_target(tmp_path, monkeypatch):
    def failing_write(image, path, *args, **kwargs):
        Path(path).write_bytes(b"half")  # a partial file, as a crash mid-write would leave
        raise RuntimeError("Exception thrown in sitk\nITK ERROR: disk full")

    monkeypatch.setattr(sitk, "WriteImage", failing_write)
    assert_one_line_input_error(io.write_image, ct_like(), tmp_path / "out.nii.gz", match="disk full")
    assert list(tmp_path.iterdir()) == []


def test_temp_file_keeps_the_real_extension(tmp_path, monkeypatch):
    seen = []
    real_write = sitk.WriteImage
    monkeypatch.setattr(sitk, "WriteImage", lambda image, path, **kw: (seen.append(path), real_write(image, path, **kw)))
    io.write_image(ct_like(), tmp_path / "seg.nii.gz")
    name = Path(seen[0]).name
    assert name.startswith(".seg.partial-") and name.endswith(".nii.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["seg.nii.gz"]


def test_write_json_is_indented_and_refuses_existing_file(tmp_path):
    path = tmp_path / "report" / "manifest.json"
    io.write_json({"liver_ml": 1520.5, "labels": [1, 2]}, path)
    assert json.loads(path.read_text()) == {"liver_ml": 1520.5, "labels": [1, 2]}
    assert "\n  " in path.read_text()
    assert_one_line_input_error(io.write_json, {}, path, match="already exists")
    io.write_json({"v": 2}, path, overwrite=True)
    assert json.loads(path.read_text()) == {"v": 2}
    assert [p.name for p in path.parent.iterdir()] == ["manifest.json"]


def test_write_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        io.write_json({"dice": float("nan")}, tmp_path / "r.json")
    assert list(tmp_path.iterdir()) == []


def random_labels() -> sitk.Image:
    """A label map that compresses badly, so that its file is far larger than the full disk allows."""
    return sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 3, (32, 64, 64)).astype(np.uint8))


WRITERS = {
    "nii": lambda path: io.write_image(ct_like(), path.with_suffix(".nii")),
    "nii.gz": lambda path: io.write_image(ct_like(), path.with_suffix(".nii.gz")),
    "nrrd": lambda path: io.write_image(ct_like(), path.with_suffix(".nrrd")),
    "mha": lambda path: io.write_image(ct_like(), path.with_suffix(".mha")),
    "seg.nrrd": lambda path: write_slicer_segmentation(random_labels(), path.with_suffix(".seg.nrrd")),
    "json": lambda path: io.write_json({"values": list(range(20000))}, path.with_suffix(".json")),
}


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_short_write_on_a_full_disk_is_an_error_and_leaves_nothing(tmp_path, writer):
    with file_size_limit(8000):  # every file is cut off after 8 kB, as on a disk that fills up
        assert_one_line_input_error(WRITERS[writer], tmp_path / "out", match="cannot write the output")
    assert list(tmp_path.iterdir()) == []


def test_of_two_writers_racing_for_one_new_output_one_wins_and_the_other_is_refused(tmp_path):
    path = tmp_path / "out.txt"
    both_written = threading.Barrier(2)  # both past the existence check, both with a complete temp file

    def writer(text: str) -> str:
        def write(temp: Path) -> None:
            temp.write_text(text)
            both_written.wait(timeout=30)

        try:
            io.atomic_write(path, ".txt", False, write)
            return text
        except InputError as refusal:
            return str(refusal)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(writer, ["first writer", "second writer"]))
    winners = [result for result in results if result.endswith("writer")]
    assert len(winners) == 1 and path.read_text() == winners[0]
    assert "already exists" in next(result for result in results if result not in winners)
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def refused(*args):
    raise PermissionError(1, "Operation not permitted")


def test_without_hard_links_an_existing_output_is_still_never_replaced(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "link", refused)  # as on FAT or some network shares
    path = io.write_text("first", tmp_path / "out.txt")
    assert_one_line_input_error(io.atomic_write, path, ".txt", False, lambda temp: temp.write_text("second"),
                                match="already exists")
    assert path.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_without_hard_links_a_failed_move_leaves_no_empty_file_at_the_name(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "link", refused)
    monkeypatch.setattr(os, "replace", refused)
    assert_one_line_input_error(io.write_text, "text", tmp_path / "out.txt", match="cannot write the output")
    assert list(tmp_path.iterdir()) == []


STALLED_WRITER = """
import sys, time
import SimpleITK as sitk
from LiverTumorDARNLib import io

def stall(image, path, **options):
    open(path, "wb").write(b"half an image")
    print("writing", flush=True)
    time.sleep(600)

sitk.WriteImage = stall
io.write_image(sitk.Image(8, 8, 8, sitk.sitkUInt8), sys.argv[1])
"""


def start_stalled_writer(path: Path) -> subprocess.Popen:
    writer = subprocess.Popen([sys.executable, "-c", STALLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "writing\n"
    return writer


def partial_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if ".partial-" in p.name}


def test_a_write_removes_what_a_killed_writer_left_but_not_a_live_writers_temp_file(tmp_path):
    target = tmp_path / "out.nii.gz"
    killed = start_stalled_writer(target)
    killed.kill()  # kill -9 in the middle of the write
    killed.wait()
    left_by_the_killed = partial_files(tmp_path)
    live = start_stalled_writer(target)
    try:
        held_by_the_live = partial_files(tmp_path) - left_by_the_killed
        io.write_image(ct_like(), target)
        assert partial_files(tmp_path) == held_by_the_live and len(left_by_the_killed) == 1
    finally:
        live.kill()
        live.wait()


def test_write_image_refuses_a_device_as_its_output_even_with_overwrite(tmp_path):
    (tmp_path / "out.nii.gz").symlink_to(os.devnull)
    assert_one_line_input_error(io.write_image, ct_like(), tmp_path / "out.nii.gz", True, match="not a regular file")


def test_a_folder_with_a_file_in_its_place_is_found_before_any_work(tmp_path):
    (tmp_path / "a-file").write_text("x")
    assert_one_line_input_error(io.check_writable_folder, tmp_path / "a-file" / "out", match="a-file is a file")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_a_read_only_folder_is_found_before_any_work(tmp_path):
    tmp_path.chmod(0o500)
    try:
        assert_one_line_input_error(io.check_writable_folder, tmp_path / "new", match="cannot write in")
    finally:
        tmp_path.chmod(0o700)
