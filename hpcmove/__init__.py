"""hpcmove: move large data sets at HPC sites through the batch system."""

__version__ = "0.1.0"
