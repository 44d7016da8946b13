"""Figures, one module per notebook."""
