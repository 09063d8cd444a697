"""The exception family. The library raises these; cli.py turns them into messages."""


class HpcmoveError(Exception):
    """Base of every error hpcmove raises on purpose."""


class UsageError(HpcmoveError):
    """The user's input cannot be acted on (bad path, bad option value)."""


class PlanError(UsageError):
    """The sources or destination cannot be planned (missing, unreadable directory...)."""


class IllegalTransition(HpcmoveError):
    """A state change that the transition table does not allow."""

    def __init__(self, kind, old, new):
        super().__init__(f"illegal {kind} state change {old} -> {new}")
        self.kind, self.old, self.new = kind, old, new


class JobNotFound(HpcmoveError):
    """No job matches the id the user gave."""


class DatabaseError(HpcmoveError):
    """The job database is missing, corrupt or unreachable."""


class SchedulerError(HpcmoveError):
    """A batch-system command failed; the message carries command, exit code and output."""

    def __init__(self, command, exit_code, stdout="", stderr=""):
        self.command, self.exit_code = list(command), exit_code
        self.stdout, self.stderr = stdout, stderr
        cmd = " ".join(self.command)
        super().__init__(
            f"command failed (exit {exit_code}): {cmd}\n"
            f"stdout: {stdout.strip()}\nstderr: {stderr.strip()}"
        )


class PluginError(HpcmoveError):
    """A backend or engine is unknown or cannot be imported."""


class TransferError(HpcmoveError):
    """A slice could not be copied. `transient` says whether a retry may help."""

    def __init__(self, message, transient=False):
        super().__init__(message)
        self.transient = transient
