"""The phantom generator: what a synthetic case must be for tests, the demo and training."""

import json

import cc3d
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from LiverTumorDARNLib.errors import InputError
from LiverTumorDARNLib.io import read_image, to_canonical
from LiverTumorDARNLib.phantom import ORIENTATIONS, TUMOR_KINDS, generate_case, write_dataset

SEEDS = range(8)


@pytest.fixture(scope="module")
def cases():
    return {seed: generate_case(seed, small=True) for seed in SEEDS}


def arrays(case):
    """CT and labels as canonical [z, y, x] arrays."""
    return (sitk.GetArrayFromImage(to_canonical(case.image)),
            sitk.GetArrayFromImage(to_canonical(case.labels)))


def test_labels_are_background_liver_and_tumor_only(cases):
    for case in cases.values():
        assert set(np.unique(arrays(case)[1])) <= {0, 1, 2}


def test_image_and_labels_share_one_grid(cases):
    for case in cases.values():
        for name in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
            assert getattr(case.image, name)() == getattr(case.labels, name)()


def test_ct_is_int16_hounsfield_with_air_fat_soft_tissue_and_bone(cases):
    for case in cases.values():
        ct, labels = arrays(case)
        assert ct.dtype == np.int16
        assert ct.min() <= -950  # air around the body
        assert (ct > 400).any()  # bone
        assert -130 < np.median(ct[(ct > -200) & (ct < -50)]) < -70  # fat


def test_liver_reads_as_enhanced_parenchyma(cases):
    for case in cases.values():
        ct, labels = arrays(case)
        expected = (95, 140) if case.phase == "portal" else (55, 100)
        assert expected[0] < np.median(ct[labels == 1]) < expected[1]


def test_liver_and_its_tumors_form_one_connected_organ(cases):
    for case in cases.values():
        _, labels = arrays(case)
        assert (labels == 1).sum() > 1000
        assert cc3d.connected_components(labels > 0, connectivity=26).max() == 1


def test_every_tumor_voxel_lies_inside_the_liver_envelope(cases):
    """A tumor replaces liver, it never sits in fat or another organ: its voxels border liver."""
    for case in cases.values():
        _, labels = arrays(case)
        components = cc3d.connected_components(labels == 2, connectivity=26)
        for lesion in range(1, components.max() + 1):
            lesion_mask = components == lesion
            shell = ndimage.binary_dilation(lesion_mask) & ~lesion_mask
            assert (labels[shell] == 1).any()


def test_manifest_tumors_match_the_label_map(cases):
    for case in cases.values():
        _, labels = arrays(case)
        voxel_ml = np.prod(case.image.GetSpacing()) / 1000
        tumor_ml = (labels == 2).sum() * voxel_ml
        listed_ml = sum(t.volume_ml for t in case.tumors)
        assert tumor_ml <= listed_ml + 1e-3 * len(case.tumors)  # overlaps count once in the map
        assert (tumor_ml > 0) == bool(case.tumors)


def test_tumor_contrast_follows_its_kind():
    """Hypodense tumors are darker than the liver around them, hyperdense ones brighter."""
    seen = set()
    for seed in range(300):
        if seen == {"hypodense", "hyperdense"}:
            break
        case = generate_case(seed, small=True)
        if len(case.tumors) != 1 or case.tumors[0].kind not in ("hypodense", "hyperdense"):
            continue
        ct, labels = arrays(case)
        if (labels == 2).sum() < 50:  # partial volume and noise hide the contrast of tiny ones
            continue
        difference = np.median(ct[labels == 2]) - np.median(ct[labels == 1])
        kind = case.tumors[0].kind
        assert difference < -10 if kind == "hypodense" else difference > 10
        seen.add(kind)
    assert seen == {"hypodense", "hyperdense"}


def test_cases_vary_in_tumor_count_kind_orientation_and_phase():
    cases = [generate_case(seed, small=True) for seed in range(30)]
    counts = {len(case.tumors) for case in cases}
    assert 0 in counts and max(counts) >= 3
    assert {t.kind for case in cases for t in case.tumors} == set(TUMOR_KINDS)
    assert {t.border for case in cases for t in case.tumors} == {"sharp", "ill_defined"}
    assert any(t.touches_liver_surface for case in cases for t in case.tumors)
    assert len({case.orientation for case in cases}) >= 4
    assert {case.phase for case in cases} == {"portal", "arterial"}


def test_the_same_seed_gives_the_same_voxels():
    first, second = generate_case(3, small=True), generate_case(3, small=True)
    assert np.array_equal(sitk.GetArrayViewFromImage(first.image), sitk.GetArrayViewFromImage(second.image))
    assert np.array_equal(sitk.GetArrayViewFromImage(first.labels), sitk.GetArrayViewFromImage(second.labels))
    assert first.image.GetDirection() == second.image.GetDirection()


def test_different_seeds_give_different_cases(cases):
    assert cases[0].image.GetSize() != cases[1].image.GetSize() or not np.array_equal(
        arrays(cases[0])[0], arrays(cases[1])[0])


def test_stored_orientation_is_the_drawn_one_with_flipped_axes(cases):
    for case in cases.values():
        assert case.orientation in ORIENTATIONS
        code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(case.image.GetDirection())
        assert code == case.orientation


def test_full_size_cases_have_clinical_geometry():
    case = generate_case(5)
    sx, sy, sz = to_canonical(case.image).GetSpacing()
    nx, ny, nz = to_canonical(case.image).GetSize()
    assert (nx, ny) == (512, 512) and 40 <= nz <= 300
    assert 0.55 <= sx == sy <= 1.0 and 0.7 <= sz <= 5.0
    assert all(3.0 <= t.diameter_mm <= 100.0 for t in case.tumors)


def test_requested_size_is_honoured():
    case = generate_case(1, small=True, size_xyz=(64, 80, 20))
    assert to_canonical(case.image).GetSize() == (64, 80, 20)


def test_randomized_mode_changes_intensities_but_not_anatomy():
    plain, randomized = generate_case(4, small=True), generate_case(4, small=True, randomize=True)
    assert np.array_equal(arrays(plain)[1], arrays(randomized)[1])
    assert not np.array_equal(arrays(plain)[0], arrays(randomized)[0])
    assert randomized.randomized and not plain.randomized


def test_dataset_is_written_in_the_lits_layout_with_a_manifest(tmp_path):
    write_dataset(tmp_path, count=2, seed=7, small=True)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [entry["seed"] for entry in manifest["cases"]] == [7, 8]
    for k, entry in enumerate(manifest["cases"]):
        volume = read_image(tmp_path / f"volume-{k}.nii.gz")
        labels = read_image(tmp_path / f"segmentation-{k}.nii.gz")
        assert list(volume.GetSize()) == entry["size"] == list(labels.GetSize())
        assert np.allclose(volume.GetSpacing(), entry["spacing_mm"], atol=1e-3)
        assert len(entry["tumors"]) == len(generate_case(7 + k, small=True).tumors)


def test_dataset_refuses_to_replace_existing_files(tmp_path):
    (tmp_path / "volume-1.nii.gz").write_bytes(b"the user's own file")
    with pytest.raises(InputError, match="--overwrite"):
        write_dataset(tmp_path, count=2, seed=0, small=True)
    assert (tmp_path / "volume-1.nii.gz").read_bytes() == b"the user's own file"
    assert not (tmp_path / "volume-0.nii.gz").exists()  # checked before anything was drawn
