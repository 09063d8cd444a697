"""The rsync engine: the SSH engine, with small files moved in bundles by rsync.

Large files move as slices exactly as in the ssh engine (`dd` at byte offsets over
several sessions of the control master). Whole small files go in bundles of up to
2,000 files, each one `rsync -e 'ssh -S SOCKET' --files-from=- --from0` through the
same control socket, never one connection per file:

- push: rsync names a file on the far side as it is named here, and the spool wants it
  at its own path. So the bundle is a private local directory of symlinks, one per file,
  at its path in the spool and pointing at the source; `rsync -L` sends what they point
  at. The files land directly at their spool paths, and one remote `xxhsum`
  (or `cksum`) over the bundle verifies what reached the remote disk.
- pull: rsync receives the listed remote paths into a staging directory inside the
  local spool (`--relative`, implied by --files-from), each is renamed to its spool
  path here (a rename is a system call, not a process), and a second session hashes
  the sources on the remote host.

Either way the local digest is taken from the bytes on the local disk, and the two
digests must agree, as for every slice. rsync must be installed on both hosts; without
it the ssh engine's tar streams carry the bundles (the choice is made at submission).
Names travel NUL-separated and are never seen by a shell.
"""
import os
import shutil
import subprocess
import tempfile
import time

from hpcmove.errors import TransferError
from hpcmove.remote import parse_sums, q, ssh_options, sums_cmd, word
from hpcmove_plugins.ssh import SshEngine, in_spool, remote_error

SHM = "/dev/shm"
# rsync splits -e at spaces and honours quotes, but not backslashes
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                  b"-_./=,:@+%")


def rsh(socket):
    """The -e value for rsync: ssh through the control socket only (as every other
    session of the job). A word outside the safe set is double-quoted; one that would
    need a double quote cannot be given to rsync."""
    words = []
    for w in ssh_options(socket):
        raw = os.fsencode(w)
        if all(c in _SAFE for c in raw):
            words.append(w)
        elif b'"' in raw:
            raise TransferError(f"rsync cannot be given the ssh option {w!r}")
        else:
            words.append('"' + w + '"')
    return " ".join(words)


def scratch():
    """Where a push's farm of symlinks goes: TMPDIR when the site or the batch system
    sets it; else /dev/shm (a farm is at most 2,000 symlinks, a few MB of memory for
    the bundle's time, where on a journaled disk each symlink can cost a millisecond:
    1.4 s a bundle here); else the system's temporary directory."""
    if not os.environ.get("TMPDIR") and os.access(SHM, os.W_OK | os.X_OK):
        return SHM
    return None


def rsync_argv(socket, *args):
    # -s: the remote path goes to the remote rsync as an argument, not through a shell
    return ["rsync", "-s", "-e", rsh(socket), "--files-from=-", "--from0",
            "--chmod=F600,D700", "--whole-file", "--inplace", *args]


def _remote(host, path):
    return os.fsencode(host) + b":" + path


class RsyncEngine(SshEngine):
    name = "rsync"
    mixed_spools = False  # one rsync run moves a bundle between two directories

    def prepare(self, unit):
        if len(unit) == 1:  # a bundle goes through rsync, which opens its own session
            super().prepare(unit)

    def _push_bundle(self, items):
        spool = items[0]["root"]
        names = [in_spool(i) for i in items]
        ours, problems, sent = {}, {}, []
        farm = tempfile.mkdtemp(prefix="hpcmove-rsync-", dir=scratch())
        try:
            for item, name in zip(items, names):
                try:
                    ours[item["slice"]] = self._source_digest(item)
                except TransferError as e:
                    problems[item["slice"]] = str(e)
                    continue
                link = os.path.join(os.fsencode(farm), name)
                os.makedirs(os.path.dirname(link), exist_ok=True)
                os.symlink(item["src"], link)
                sent.append(name)
            if sent:
                self._rsync(["-L", farm + "/", _remote(self.remote.host, word(spool) + b"/")],
                            b"\0".join(sent) + b"\0", f"writing a bundle into "
                                                      f"{os.fsdecode(spool)}")
        finally:
            shutil.rmtree(farm, ignore_errors=True)
        theirs = {}
        if sent and not self.defer_verify:  # else finalize's at-rest check hashes them there
            # the names on stdin: 2,000 of them would not fit in one remote command
            code, out, err = self.remote.run(b"cd " + q(word(spool)) + b" && xargs -0 "
                                             + sums_cmd(self.kind) + b" --",
                                             input=b"".join(n + b"\0" for n in sent),
                                             check=False)
            theirs = parse_sums(out, sent, self.kind)
        got = {}
        for item, name in zip(items, names):
            if item["slice"] in ours:
                # the source must not have changed while rsync read it
                if not self._unchanged(item):
                    got[item["slice"]] = (ours[item["slice"]], "", "source changed while read")
                else:
                    got[item["slice"]] = (ours[item["slice"]], None if self.defer_verify
                                          else theirs.get(name, ""), "")
            else:
                got[item["slice"]] = ("", "", problems.get(item["slice"], ""))
        return got

    def _source_digest(self, item):
        fd, _st = self.open_item(item)
        try:
            return self._fd_digest(fd, 0, item["size"])
        except OSError as e:
            raise self._error(e, item["src"]) from e
        finally:
            os.close(fd)

    @staticmethod
    def _unchanged(item):
        try:
            st = os.lstat(item["src"])
        except OSError:
            return False
        return st.st_size == item["size"] and st.st_mtime_ns == item["mtime_ns"]

    def _pull_bundle(self, items):
        srcs = [i["src"] for i in items]  # absolute: made so at submission
        listing = b"\0".join(s.lstrip(b"/") for s in srcs) + b"\0"
        held = self.remote.hold(2)  # the digests' session and rsync's, at once
        sums = self.remote.session(b"xargs -0 " + sums_cmd(self.kind) + b" --", held=held[:1])
        stage = tempfile.mkdtemp(prefix=b".rsync-", dir=items[0]["root"])  # not in the tree
        try:
            try:
                self._rsync([_remote(self.remote.host, b"/"), stage + b"/"], listing,
                            f"reading a bundle from {self.remote.host}", held=held[1:])
                failure = ""
            except TransferError as e:  # files that did arrive are still used
                if getattr(e, "auth", False):
                    raise
                failure = str(e)
            ours = {}
            for item, src in zip(items, srcs):
                got = os.path.join(stage, src.lstrip(b"/"))
                try:
                    if os.lstat(got).st_size != item["size"]:
                        continue
                    os.rename(got, item["spool"])
                except OSError:
                    continue
                ours[item["slice"]] = None if self.defer_verify else \
                    self._local_digest(item["spool"], 0, item["size"])  # else at rest
        finally:
            shutil.rmtree(stage, ignore_errors=True)
            theirs_out, _err = sums.communicate(b"\0".join(srcs) + b"\0")
        if sums.returncode == 255:
            self.remote.check_alive()
        theirs = parse_sums(theirs_out, srcs, self.kind)
        out = {}
        for item, src in zip(items, srcs):
            if item["slice"] in ours:
                out[item["slice"]] = (theirs.get(src, ""), ours[item["slice"]], "")
            else:
                out[item["slice"]] = ("", "", failure or f"not received from "
                                                         f"{self.remote.host}")
        return out

    def _rsync(self, args, listing, what, held=None):
        """rsync through the socket, in a session slot (`held`, or the next free one)."""
        start = time.monotonic()
        held = self.remote.hold() if held is None else held
        try:
            done = subprocess.run(rsync_argv(self.remote.socket, *args), input=listing,
                                  capture_output=True)
        finally:
            self.remote.release(held)
        if done.returncode in (0, 23, 24):  # 23/24: some files missing; verified per file
            return time.monotonic() - start
        if done.returncode in (12, 255):  # protocol stream or ssh broke: is the socket gone?
            self.remote.check_alive()
        raise remote_error(self.remote.host, f"{what}: rsync", done.stderr, done.returncode)
