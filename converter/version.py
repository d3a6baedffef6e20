"""The mxconv version, recorded in every provenance file and report."""

__version__ = "0.1.0"
