"""CACR: cross-modal attention congruence regularization for UNITER image-text matching."""

__version__ = "0.1.0"
