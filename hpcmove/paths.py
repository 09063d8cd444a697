"""Where hpcmove keeps its own files (database, job directories). Honours HPCMOVE_HOME."""
import os

import platformdirs


def data_dir():
    return os.environ.get("HPCMOVE_HOME") or platformdirs.user_data_dir("hpcmove")


def jobs_dir():
    return os.path.join(data_dir(), "jobs")
