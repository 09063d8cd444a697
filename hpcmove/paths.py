"""Where hpcmove keeps its own files (database, job directories). Honours HPCMOVE_HOME."""
import os


def data_dir():
    if os.environ.get("HPCMOVE_HOME"):
        return os.environ["HPCMOVE_HOME"]
    import platformdirs  # 20-35 ms to import: only when it is needed (every task pays it)
    return platformdirs.user_data_dir("hpcmove")


def jobs_dir():
    return os.path.join(data_dir(), "jobs")
