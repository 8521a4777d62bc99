"""Training, one loop for every stage (``livertumordarn train --stage liver|tumor|refine``).

    options.py       TrainConfig, each stage's defaults, the command's options (no torch)
    loop.py          the loop: optimiser, schedule, mixed precision, validation, resume, DDP
    data.py          where cases come from (phantoms, CT on label maps, LiTS folders), the pool
    checkpoints.py   last.pt / best.pt, written atomically; what resume accepts
    losses.py        Dice + cross-entropy, deep supervision
    augmentation.py  DARN's augmentation
    darn_task.py     the liver and tumor stages: prepared cases, patches, validation
    refine_task.py   the refinement network: coarse masks (DARN's, corrupted truth, click seeds)

Nothing is imported here, so that the command line reads ``options`` without PyTorch::

    from LiverTumorDARNLib.training.loop import train
    from LiverTumorDARNLib.training.options import TrainConfig
"""
