"""Evaluation: metrics, bootstrap, site invariance, survival, Grad-CAM, claims and verdicts."""
