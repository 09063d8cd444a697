"""Where the time goes inside batch tasks: with HPCMOVE_PROFILE=DIR, the worker and
finalize write cProfile data to DIR/<name>-<pid>.prof (read it with `python -m pstats`).
Off by default; costs nothing then."""
import cProfile
import os


def run(name, fn, *args):
    directory = os.environ.get("HPCMOVE_PROFILE")
    if not directory:
        return fn(*args)
    profile = cProfile.Profile()
    try:
        return profile.runcall(fn, *args)
    finally:
        profile.dump_stats(os.path.join(directory, f"{name}-{os.getpid()}.prof"))
