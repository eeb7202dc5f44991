"""Whether a SLURM job has ended, as the run folder's lock needs to know of a job that took it on
another node (its process cannot be asked from here)."""

from __future__ import annotations

import subprocess

SQUEUE_TIMEOUT_S = 10


def slurm_job_ended(job: str) -> bool:
    """True only where ``squeue`` answers that it no longer knows job ``job`` (nothing listed,
    or 'Invalid job id' once SLURM has forgotten it); False where it lists it or cannot tell
    (no squeue here, no answer): a lock is never taken over on a guess."""
    if not job.isdigit():
        return False
    try:
        done = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                              text=True, timeout=SQUEUE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if done.returncode != 0:
        return "Invalid job id" in done.stderr
    return not done.stdout.strip()
