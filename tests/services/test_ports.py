"""Two Ray heads on one machine: neither takes a port the other needs.

A head started with ``ray.init()`` gives its dashboard agent Ray's fixed port 52365; a second such head
on the machine then loses its agent and refuses every job submission. ``start_local_head`` (``dkdm up``
and the embedded engine) lets the agent take a free port. The test fixtures' ports are claimed
machine-wide, so two test sessions side by side never hand out the same one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import textwrap

from tests.services.conftest import BIN, CLAIMS, ROOT, _claim, cluster_env

HEAD_TAKES_A_JOB = textwrap.dedent(
    """
    import logging, tempfile, time
    import ray
    from ray.job_submission import JobStatus, JobSubmissionClient
    from services.engine.embedded import free_port, start_local_head

    port = free_port()
    start_local_head(num_cpus=1, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                     logging_level=logging.WARNING, _temp_dir=tempfile.mkdtemp(prefix="dkdm-ap-", dir="/tmp"))
    try:
        client = JobSubmissionClient(f"http://127.0.0.1:{port}")
        job = client.submit_job(entrypoint="echo submitted")
        deadline = time.monotonic() + 120
        while not client.get_job_status(job).is_terminal() and time.monotonic() < deadline:
            time.sleep(0.5)
        print(client.get_job_status(job).value)
        print(client.get_job_logs(job))
    finally:
        ray.shutdown()
    """
)


def test_a_local_head_takes_jobs_while_another_holds_rays_default_agent_port() -> None:
    holder = socket.socket()
    try:
        holder.bind(("", 52365))  # as another Ray head on this machine would
        holder.listen()
    except OSError:
        pass  # something holds it already: the case under test all the same
    try:
        done = subprocess.run(
            [str(BIN / "python"), "-c", HEAD_TAKES_A_JOB],
            cwd=ROOT,
            env=cluster_env(RAY_AUTH_MODE="disabled"),
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        holder.close()
    assert done.returncode == 0, done.stderr[-4000:]
    status, *logs = done.stdout.splitlines()
    assert status == "SUCCEEDED" and "submitted" in logs, done.stdout + done.stderr[-4000:]


def test_a_port_claimed_by_a_live_process_is_not_handed_out_until_it_is_gone() -> None:
    other = subprocess.Popen(["sleep", "60"])
    port = 19999  # below the fixtures' range: no session hands it out
    try:
        CLAIMS.mkdir(exist_ok=True)
        (CLAIMS / str(port)).write_text(str(other.pid))
        assert not _claim(port)
        other.kill()
        other.wait()
        assert _claim(port)  # the claim of a process that is gone is taken over
        assert (CLAIMS / str(port)).read_text() == str(os.getpid())
    finally:
        other.kill()
        (CLAIMS / str(port)).unlink(missing_ok=True)
