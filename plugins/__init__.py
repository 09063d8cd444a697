"""Transfer engines shipped with hpcmove, registered under the `hpcmove.engines` entry points."""
