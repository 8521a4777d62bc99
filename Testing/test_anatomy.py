"""CT drawn on real label maps: reading the shared data sets right, drawing a believable scan on
them, and skipping bad maps. The maps here are small made-up abdomens in each data set's numbering."""

import numpy as np
import pytest
import SimpleITK as sitk

from LiverTumorDARNLib.anatomy import Organ, draw_case, read_label_map, split_maps, usable_label_maps
from LiverTumorDARNLib.errors import InputError
from LiverTumorDARNLib.io import to_canonical

BTCV = {"spleen": 1, "right kidney": 2, "left kidney": 3, "liver": 5, "stomach": 6, "aorta": 7}


def ellipsoid(shape, centre, radii):
    z, y, x = np.ogrid[tuple(slice(0, n) for n in shape)]
    return ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((x - centre[2]) / radii[2]) ** 2 <= 1


def made_up_abdomen(numbers=BTCV, shape=(40, 80, 96)) -> np.ndarray:
    """An abdomen at 5 x 3 x 3 mm in canonical axes (x to the patient's left, y to the back): a
    liver on the right whose thin left lobe reaches across, spleen, kidneys behind the stomach."""
    labels = np.zeros(shape, np.uint8)
    labels[ellipsoid(shape, (24, 40, 62), (8, 10, 8))] = numbers["stomach"]
    labels[ellipsoid(shape, (20, 52, 76), (10, 10, 6))] = numbers["spleen"]
    labels[ellipsoid(shape, (14, 56, 30), (7, 6, 5))] = numbers["right kidney"]
    labels[ellipsoid(shape, (14, 56, 66), (7, 6, 5))] = numbers["left kidney"]
    labels[(np.abs(np.arange(shape[1]) - 50)[None, :, None] <= 3) & (np.abs(np.arange(shape[2]) - 52)[None, None, :] <= 3)
           & (np.arange(shape[0]) < 34)[:, None, None]] = numbers["aorta"]
    liver = ellipsoid(shape, (28, 40, 26), (9, 16, 16)) | ellipsoid(shape, (30, 30, 46), (4, 6, 14))
    labels[liver & (labels == 0)] = numbers["liver"]
    return labels


def write_map(array: np.ndarray, path, spacing=(3.0, 3.0, 5.0)):
    """Store a canonical [z, y, x] array as a file in ITK's LPS frame."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def organs_of(path) -> np.ndarray:
    return sitk.GetArrayFromImage(read_label_map(path))


@pytest.fixture(scope="module")
def abdomen(tmp_path_factory):
    return write_map(made_up_abdomen(), tmp_path_factory.mktemp("anatomy") / "btcv" / "label0001.nii.gz")


@pytest.fixture(scope="module")
def drawn(abdomen):
    return draw_case(abdomen, seed=3)


def test_each_data_set_s_numbers_are_read_as_its_organs(abdomen):
    organs = organs_of(abdomen)
    truth = made_up_abdomen()
    assert np.array_equal(organs == Organ.LIVER, truth == BTCV["liver"])
    assert np.array_equal(organs == Organ.KIDNEY, np.isin(truth, (2, 3)))
    assert np.array_equal(organs == Organ.SPLEEN, truth == BTCV["spleen"])


def test_a_map_stored_back_to_front_is_turned_so_the_kidneys_lie_behind_the_stomach(tmp_path):
    path = write_map(made_up_abdomen()[:, ::-1, :], tmp_path / "btcv" / "label0002.nii.gz")
    assert np.array_equal(organs_of(path) == Organ.LIVER, made_up_abdomen() == BTCV["liver"])


def test_a_liver_stored_mirrored_is_turned_so_its_left_lobe_points_to_the_patient_s_left(tmp_path):
    liver = (made_up_abdomen() == BTCV["liver"]).astype(np.uint8)
    path = write_map(liver[:, :, ::-1], tmp_path / "lits-liver" / "segmentation-1.nii.gz")
    assert np.array_equal(organs_of(path) == Organ.LIVER, liver == 1)


def test_a_map_without_liver_is_refused_in_one_line_naming_it(tmp_path):
    path = write_map(np.where(made_up_abdomen() == BTCV["liver"], 0, made_up_abdomen()), tmp_path / "btcv" / "x.nii.gz")
    with pytest.raises(InputError, match=r"x\.nii\.gz: label map has no liver \(label 5\)"):
        read_label_map(path)


def test_a_missing_map_is_refused_in_one_line_naming_it(tmp_path):
    with pytest.raises(InputError, match="nothing.nii.gz"):
        read_label_map(tmp_path / "nothing.nii.gz")


def test_the_same_map_and_seed_draw_the_same_voxels(abdomen, drawn):
    again = draw_case(abdomen, seed=3)
    assert np.array_equal(sitk.GetArrayViewFromImage(again.image), sitk.GetArrayViewFromImage(drawn.image))


def test_a_drawn_case_is_ct_in_hounsfield_units_around_the_map_s_liver(drawn):
    ct = sitk.GetArrayFromImage(to_canonical(drawn.image))
    labels = sitk.GetArrayFromImage(to_canonical(drawn.labels))
    assert ct.dtype == np.int16 and set(np.unique(labels)) <= {0, 1, 2}
    liver_hu = np.median(ct[labels == 1])
    assert 40 < liver_hu < 200  # enhanced liver in either phase
    assert np.percentile(ct, 5) < -900  # air around the body
    assert (ct > 300).sum() > 1000  # bone: ribs and spine were drawn
    liver_ml = (labels > 0).sum() * np.prod(drawn.image.GetSpacing()) / 1000
    assert 800 < liver_ml < 3500  # brought into the adult range


def test_the_liver_is_drawn_on_the_patient_s_right(drawn):
    labels = sitk.GetArrayFromImage(to_canonical(drawn.labels))
    x_liver = np.argwhere(labels > 0)[:, 2].mean()
    assert x_liver < labels.shape[2] / 2  # canonical x runs to the patient's left


def test_tumors_lie_in_the_liver_or_bulge_from_it(drawn):
    labels = sitk.GetArrayFromImage(drawn.labels)
    from scipy import ndimage
    components, count = ndimage.label(labels == 2)
    liver = ndimage.binary_dilation(labels == 1)
    for index in range(1, count + 1):
        assert (liver & (components == index)).any()


def test_bad_maps_are_skipped_with_one_warning_that_counts_them(abdomen, tmp_path):
    folder = tmp_path / "maps"
    write_map(made_up_abdomen(), folder / "btcv" / "label0003.nii.gz")
    write_map(np.zeros((20, 40, 40), np.uint8), folder / "btcv" / "label0004.nii.gz")
    (folder / "btcv" / "label0005.nii.gz").write_bytes(b"not an image")
    warnings = []
    assert [p.name for p in usable_label_maps(folder, warn=warnings.append)] == ["label0003.nii.gz"]
    assert len(warnings) == 1 and warnings[0].startswith("skipped 2 of 3 label maps")


def test_a_folder_of_only_bad_maps_is_refused(tmp_path):
    write_map(np.zeros((20, 40, 40), np.uint8), tmp_path / "btcv" / "label0004.nii.gz")
    with pytest.raises(InputError, match="none of its 1 label maps is usable"):
        usable_label_maps(tmp_path, warn=lambda _: None)


def test_every_tenth_map_of_each_data_set_is_held_out_for_validation(tmp_path):
    paths = [tmp_path / "btcv" / f"label{k:04d}.nii.gz" for k in range(20)]
    paths += [tmp_path / "lits-liver" / f"segmentation-{k}.nii.gz" for k in range(10)]
    train, validation = split_maps(paths)
    assert len(validation) == 3 and not set(train) & set(validation)
    assert {p.parent.name for p in validation} == {"btcv", "lits-liver"}


def test_the_phantom_command_draws_case_k_on_map_k_in_turn(abdomen, tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "cases"
    result = subprocess.run([sys.executable, "-m", "LiverTumorDARNLib.cli", "phantom", str(out), "--anatomy",
                             str(abdomen.parent.parent), "--n", "1", "--seed", "4"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["generator"] == "LiverTumorDARN anatomy"
    assert manifest["cases"][0]["label_map"] == "label0001.nii.gz"
    assert (out / "volume-0.nii.gz").is_file() and (out / "segmentation-0.nii.gz").is_file()


def test_small_cases_are_refused_on_real_label_maps(abdomen, tmp_path):
    from LiverTumorDARNLib.phantom import write_dataset

    with pytest.raises(InputError, match="--small draws phantoms"):
        write_dataset(tmp_path, 1, 0, small=True, anatomy=abdomen)
    assert not any(tmp_path.iterdir())


def test_weights_trained_on_label_maps_name_the_data_sets_and_their_licences(abdomen, tmp_path):
    import json

    from LiverTumorDARNLib.models import build_model
    from LiverTumorDARNLib.training.checkpoints import save_checkpoint
    from LiverTumorDARNLib.weights import export_checkpoint

    architecture = {"encoder_widths": (4, 8), "pyramid_width": 4, "order": "spa_sem", "in_channels": 1, "num_classes": 2}
    checkpoint = save_checkpoint({
        "model": build_model(architecture).state_dict(), "model_config": architecture, "iteration": 10,
        "stage": {"name": "liver", "spacing_mm": (4.0,) * 3, "num_classes": 2, "patch_size": (16,) * 3},
        "config": {"anatomy": str(abdomen.parent.parent), "phantom_fraction": 0.2, "randomize_fraction": 0.3}},
        tmp_path / "last.pt")
    export_checkpoint(checkpoint, tmp_path / "models")
    record = json.loads((tmp_path / "models" / "manifest.json").read_text())["models"]["liver"]["training"]
    assert "BTCV" in record["label_map_licences"]["btcv"]
    assert "real label maps (btcv" in record["data"]
