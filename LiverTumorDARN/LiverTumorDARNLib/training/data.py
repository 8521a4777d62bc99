"""Where training cases come from, and how they are held in memory.

    phantoms drawn on the fly | CT drawn on real label maps | a LiTS-layout folder
      -> RawCase (CT, labels, seed) -> the stage's task prepares it (a DARN crop, a refinement scan)
      -> a pool of prepared cases; one replaced every ``refresh_every`` iterations, made in worker
         processes when cases are slow to make, so that training never waits for them

- Phantom seeds: training uses ``phantom_seed_start`` upwards (interleaved over DDP ranks),
  validation phantoms start at the task's validation seed (800000 upwards), and the benchmarks own
  900000 upwards. A run whose seeds would reach the validation range is refused, so no
  validation or benchmark case is ever trained on. A share ``randomize_fraction`` of the training
  phantoms is domain-randomised (SynthSeg-style); validation phantoms never are, because the
  target is realistic CT.
- Label maps (``anatomy``): every tenth map of each data set is held out, and validation CT is
  drawn on those (``anatomy.split_maps``).
- LiTS folders: ``volume-K.nii[.gz]`` with ``segmentation-K.nii[.gz]``; ``val_cases`` pairs are
  held out by a permutation seeded with ``seed`` (the same on every rank and on resume), not the
  last K, because LiTS case numbers group the contributing hospitals.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import multiprocessing
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Generic, Iterator, Sequence, TypeVar

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..io import read_ct, read_image
from ..phantom import BENCHMARK_SEED_START, VALIDATION_SEED_START, generate_case
from .options import TrainConfig

LITS_NAME = re.compile(r"^(volume|segmentation)-(\d+)\.nii(\.gz)?$")

Case = TypeVar("Case")


@dataclasses.dataclass
class RawCase:
    """A CT in HU and its label map (0 background, 1 liver, 2 tumor); ``seed`` makes the random
    choices of preparing it (which voxels centre patches, whether DARN segments it) repeatable."""

    image: sitk.Image
    labels: sitk.Image
    seed: int


# --------------------------------------------------------------------------------------------
# Sources: index -> RawCase (picklable, for worker processes)


@dataclasses.dataclass(frozen=True)
class PhantomCases:
    """Case ``index`` is the phantom with seed ``first_seed + index * stride``."""

    first_seed: int
    stride: int
    small: bool
    randomize_fraction: float

    def __call__(self, index: int) -> RawCase:
        seed = self.first_seed + index * self.stride
        randomize = bool(np.random.default_rng([seed, 2]).random() < self.randomize_fraction)
        case = generate_case(seed, small=self.small, randomize=randomize)
        return RawCase(case.image, case.labels, seed)


@dataclasses.dataclass(frozen=True)
class AnatomyCases:
    """Case ``index`` is CT drawn on one of ``maps`` (picked by the case's seed, or taken in turn
    with ``in_turn``), or with probability ``phantom_fraction`` a phantom of that seed."""

    maps: tuple[Path, ...]
    first_seed: int
    stride: int
    randomize_fraction: float
    phantom_fraction: float
    in_turn: bool = False

    def __call__(self, index: int) -> RawCase:
        from ..anatomy import draw_case

        seed = self.first_seed + index * self.stride
        rng = np.random.default_rng([seed, 3])
        randomize = bool(rng.random() < self.randomize_fraction)
        if rng.random() < self.phantom_fraction:
            case = generate_case(seed, randomize=randomize)
        else:
            first = index if self.in_turn else int(rng.integers(len(self.maps)))
            case = _first_drawable(self.maps, first, seed, randomize, draw_case)
        return RawCase(case.image, case.labels, seed)


def _first_drawable(maps: Sequence[Path], first: int, seed: int, randomize: bool, draw: Callable):
    """The case drawn on ``maps[first]``, or on the next map that can be drawn, with a warning:
    one odd map must not stop a run of hours."""
    for offset in range(len(maps)):
        path = maps[(first + offset) % len(maps)]
        try:
            return draw(path, seed, randomize=randomize)
        except InputError as error:
            warnings.warn(f"skipped a label map while drawing training cases: {error}")
    raise InputError(f"no label map among {len(maps)} could be drawn on")


@dataclasses.dataclass(frozen=True)
class LitsCases:
    """Case ``index`` is pair ``index mod n`` of a fixed list of (volume, segmentation) files."""

    pairs: tuple[tuple[Path, Path], ...]

    def __call__(self, index: int) -> RawCase:
        volume, segmentation = self.pairs[index % len(self.pairs)]
        return RawCase(read_ct(volume), read_image(segmentation), index)


@dataclasses.dataclass(frozen=True)
class Prepared(Generic[Case]):
    """Case ``index`` of a raw source, prepared for the task (picklable, for worker processes)."""

    raw: Callable[[int], RawCase]
    prepare: Callable[[RawCase], Case]

    def __call__(self, index: int) -> Case:
        return self.prepare(self.raw(index))


def find_lits_pairs(folder: Path) -> list[tuple[Path, Path]]:
    """(volume, segmentation) files of a LiTS-layout folder, paired by case number, sorted by it."""
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder; --data needs a folder of volume-K.nii[.gz] and segmentation-K.nii[.gz] files")
    found: dict[str, dict[int, Path]] = {"volume": {}, "segmentation": {}}
    for path in folder.iterdir():
        match = LITS_NAME.match(path.name)
        if match:
            found[match.group(1)][int(match.group(2))] = path
    numbers = sorted(found["volume"].keys() & found["segmentation"].keys())
    if not numbers:
        raise InputError(f"{folder}: no volume-K.nii[.gz] with a matching segmentation-K.nii[.gz]; expected the LiTS layout")
    return [(found["volume"][k], found["segmentation"][k]) for k in numbers]


def split_lits_pairs(pairs: Sequence[tuple[Path, Path]], val_cases: int, seed: int) -> tuple[list, list]:
    """(training, validation) pairs; the held-out ones are chosen by a permutation seeded with ``seed``."""
    if len(pairs) <= val_cases:
        raise InputError(f"{len(pairs)} case(s) in the data folder, {val_cases} held out for validation: none left to train on; lower --val-cases")
    order = np.random.default_rng(seed).permutation(len(pairs))
    return [pairs[i] for i in order[val_cases:]], [pairs[i] for i in order[:val_cases]]


def raw_sources(config: TrainConfig, rank: int, ranks: int,
                validation_seed_start: int) -> tuple[Callable[[int], RawCase], Callable[[int], RawCase]]:
    """(training source for this DDP rank, validation source), as the config's data asks."""
    if config.anatomy is not None:
        from ..anatomy import split_maps, usable_label_maps

        train_maps, val_maps = split_maps(usable_label_maps(Path(config.anatomy)))
        if not val_maps or not train_maps:
            raise InputError(f"{config.anatomy}: too few usable label maps to hold some out for validation")
        train = AnatomyCases(tuple(train_maps), config.phantom_seed_start + rank, ranks,
                             config.randomize_fraction, config.phantom_fraction)
        return train, AnatomyCases(tuple(val_maps), validation_seed_start, 1, 0.0, 0.0, in_turn=True)
    if config.data is None:
        check_phantom_seeds(config, ranks)
        train = PhantomCases(config.phantom_seed_start + rank, ranks, config.phantom_small, config.randomize_fraction)
        return train, PhantomCases(validation_seed_start, 1, config.phantom_small, 0.0)
    train_pairs, val_pairs = split_lits_pairs(find_lits_pairs(Path(config.data)), config.val_cases, config.seed)
    rank_order = np.random.default_rng([config.seed, rank]).permutation(len(train_pairs))
    return LitsCases(tuple(train_pairs[i] for i in rank_order)), LitsCases(tuple(val_pairs))


def check_phantom_seeds(config: TrainConfig, ranks: int) -> None:
    """Refuse a run whose training phantoms would reach the validation (or benchmark) seeds: every
    rank draws the pool and one case per refresh."""
    cases_per_rank = config.pool_size + config.iterations // config.refresh_every + 1
    last_seed = config.phantom_seed_start + cases_per_rank * ranks
    if config.phantom_seed_start < 0 or last_seed >= VALIDATION_SEED_START:
        raise InputError(f"training phantom seeds {config.phantom_seed_start}..{last_seed} must lie in "
                         f"0..{VALIDATION_SEED_START - 1}: validation phantoms start at {VALIDATION_SEED_START}, "
                         f"benchmark phantoms at {BENCHMARK_SEED_START}")


# --------------------------------------------------------------------------------------------
# The pool


def make_cases(source: Callable[[int], Case], indices: Sequence[int],
               executor: concurrent.futures.Executor | None) -> list[Case]:
    """Cases ``indices`` of ``source``, in worker processes when there is an executor."""
    if executor is None:
        return [source(i) for i in indices]
    return list(executor.map(source, indices))


class CasePool(Generic[Case]):
    """Prepared cases held in memory; :meth:`refresh` swaps one for the next case of the source.

    With an executor the cases are made in worker processes and a refresh never waits: it swaps
    in the case made in the background since the last refresh, if it is ready.
    """

    def __init__(self, source: Callable[[int], Case], size: int, first_index: int,
                 executor: concurrent.futures.Executor | None, rng: np.random.Generator):
        self._source, self._executor, self._rng = source, executor, rng
        self.cases = make_cases(source, range(first_index, first_index + size), executor)
        self._next_index = first_index + size
        self._pending: concurrent.futures.Future | None = None

    def refresh(self) -> None:
        if self._executor is None:
            self._replace_one(self._source(self._next_index))
            self._next_index += 1
            return
        if self._pending is not None and self._pending.done():
            self._replace_one(self._pending.result())
            self._pending = None
        if self._pending is None:
            self._pending = self._executor.submit(self._source, self._next_index)
            self._next_index += 1

    def _replace_one(self, case: Case) -> None:
        self.cases[int(self._rng.integers(len(self.cases)))] = case


@contextlib.contextmanager
def case_workers(config: TrainConfig) -> Iterator[concurrent.futures.Executor | None]:
    """Worker processes for making cases (``config.workers``), or None to make them in this process.

    Spawned, not forked: a fork of a process running torch's thread pools can deadlock. Each
    worker runs one thread, as there is one worker per core. On exit a case still being made is
    abandoned rather than waited for.
    """
    workers = config.workers
    if workers is None:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        small = config.data is None and config.anatomy is None and config.phantom_small
        workers = 0 if small else max(1, min(config.pool_size, (os.cpu_count() or 1) // local_ranks))
    if workers == 0:
        yield None
        return
    executor = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                      initializer=_one_thread)
    try:
        yield executor
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)
