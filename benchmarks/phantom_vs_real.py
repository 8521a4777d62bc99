"""How close are the phantoms to real contrast-enhanced CT? The same statistics on both.

    .venv/bin/python benchmarks/phantom_vs_real.py [--seeds 5]

Reads the real LiTS case in ../shared/realct/lits-volume-0 (liver and tumor merged in its mask)
and draws full-size phantoms from seeds far from those the tests use. For each scan: the
liver's median HU and spread, CT noise in the liver (from differences of neighbouring voxels
along x, which removes the anatomy), the share of body voxels that are fat, soft tissue and bone,
the liver volume and the liver's share of the body. Nothing here trains on the real case.
"""

import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from LiverTumorDARNLib.io import read_ct, read_image, to_canonical
from LiverTumorDARNLib.phantom import BENCHMARK_SEED_START, generate_case

REAL = Path(__file__).resolve().parents[2] / "shared" / "realct" / "lits-volume-0"


def statistics(ct: sitk.Image, liver_labels: sitk.Image) -> dict:
    hu = sitk.GetArrayFromImage(to_canonical(ct)).astype(np.float32)
    liver = sitk.GetArrayFromImage(to_canonical(liver_labels)) > 0
    body = ndimage.binary_opening(hu > -400, iterations=2)
    inner = ndimage.binary_erosion(liver, iterations=3)
    neighbour_difference = np.diff(hu, axis=2)[inner[:, :, 1:] & inner[:, :, :-1]]
    q25, q50, q75 = np.percentile(hu[liver], [25, 50, 75])
    voxel_ml = np.prod(ct.GetSpacing()) / 1000
    return {
        "liver median HU": q50,
        "liver IQR HU": q75 - q25,
        "noise in liver HU": np.std(neighbour_difference) / np.sqrt(2),
        "fat % of body": 100 * np.mean((hu[body] > -190) & (hu[body] < -30)),
        "soft tissue % of body": 100 * np.mean((hu[body] >= -30) & (hu[body] < 300)),
        "bone % of body": 100 * np.mean(hu[body] >= 300),
        "liver volume mL": liver.sum() * voxel_ml,
        "liver % of body (scanned part)": 100 * liver.sum() / body.sum(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    columns = {"real LiTS volume-0": statistics(read_ct(REAL / "ct.nii.gz"), read_image(REAL / "liver.nii.gz"))}
    for seed in range(BENCHMARK_SEED_START, BENCHMARK_SEED_START + args.seeds):
        case = generate_case(seed)
        columns[f"phantom {seed} ({case.phase})"] = statistics(case.image, case.labels)
    names = list(columns)
    print(f"{'':32s}" + "".join(f"{name[:24]:>26s}" for name in names))
    for key in columns[names[0]]:
        print(f"{key:32s}" + "".join(f"{columns[name][key]:26.1f}" for name in names))


if __name__ == "__main__":
    main()
