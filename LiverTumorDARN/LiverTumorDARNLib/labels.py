"""The label values of every label map the project reads or writes: LiTS's convention, so LiTS
files train and evaluate unchanged."""

BACKGROUND, LIVER, TUMOR = 0, 1, 2
