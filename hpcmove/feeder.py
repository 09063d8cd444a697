"""Runs as a small batch job when a transfer needs more array tasks than Slurm lets one
array hold (MaxArraySize): submits the next chunk, the feeder after it, and points the
final job (submitted once, at the start) at them.

Usage (from the rendered feed script): python -m hpcmove.feeder JOBDIR CHUNK SIZE FINAL_ID
"""
import os
import sys

from . import db, jobdir, states
from .backends.slurm import SlurmBackend


def record(job_id, *items):
    """Append batch ids to Job.array_id (see backends.parse_batch_ids)."""
    with db.atomic():
        job = db.Job.get_by_id(job_id)
        field = ",".join(filter(None, [job.array_id, *items]))
        db.Job.update(array_id=field).where(db.Job.id == job_id).execute()


def run(path, chunk_index, chunk, final_id):
    db.connect()
    job = db.Job.get(db.Job.jobdir == path)
    if job.state in states.JOB_TERMINAL or job.state == states.CANCELLING:
        return 0
    slurm = SlurmBackend()
    offset = chunk_index * chunk
    count = min(chunk, job.n_tasks - offset)
    array_id = slurm.submit_chunk(os.path.join(path, b"transfer.sh"),
                                  jobdir.log_path(path, "transfer-%A_%a.out"), offset, count,
                                  job.stripe_width)
    after, items = [array_id], [f"{array_id}@{offset}"]
    if offset + count < job.n_tasks:
        feeder = slurm.submit_feeder(os.path.join(path, b"feed.sh"),
                                     jobdir.log_path(path, "feed-%j.out"), array_id,
                                     chunk_index + 1, chunk, final_id)
        after.append(feeder)
        items.append(f"feed:{feeder}")
    record(job.id, *items)
    slurm.point_final(final_id, *after)
    db.event(job.id, "feed", f"chunk {chunk_index}: tasks {offset}-{offset + count - 1} "
                             f"as array {array_id}")
    if db.Job.get_by_id(job.id).state == states.CANCELLING:  # cancelled while we submitted
        slurm.cancel(after)
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 4:
        print("usage: python -m hpcmove.feeder JOBDIR CHUNK SIZE FINAL_ID", file=sys.stderr)
        return 2
    return run(os.fsencode(argv[0]), int(argv[1]), int(argv[2]), argv[3])


if __name__ == "__main__":
    sys.exit(main())
