"""Data: the manifest, its validation and splits, MONAI preprocessing, cohort description, importers."""
