"""``nrfm bench``: speed and scale measured as ratios on one machine."""
