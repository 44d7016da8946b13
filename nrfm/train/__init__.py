"""Training: SSL pretraining, fine-tuning with ERM / reweighted / group DRO, distribution, monitor."""
