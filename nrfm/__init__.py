"""nrfm: a notebook-driven reproduction kit for NeuroRAD-FM (Bhattacharya et al., arXiv 2509.15416)."""
__version__ = "0.1.0"
