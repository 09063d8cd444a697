"""hpcmove: move large data sets at HPC sites through the batch system.

The Python API: `hpcmove.submit(sources, dest, **options) -> hpcmove.Job`, and
`hpcmove.Job.load(id)`; see hpcmove.api.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # imported on first use, so `python -m hpcmove.worker` in a batch task stays light
    if name in ("submit", "Job"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'hpcmove' has no attribute {name!r}")
