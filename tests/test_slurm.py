"""The tiny workflow on a real SLURM cluster (slurmctld + slurmd + slurmdbd on 127.0.0.1) through the project's
SLURM profile: declared resources reach `sacct`, a `scancel`-ed job is rerun, a job over its memory is reported
and succeeds with more memory.

The cluster is installed (Debian packages, as root) and started by `slurm_cluster`; the test skips with the reason
when that is impossible (no root, no apt-get, a daemon does not start). About 2-3 minutes on 2 cores.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import (
    ACCOUNT,
    PARTITION,
    ClusterUnavailable,
    LocalSlurmCluster,
    install_slurm,
)
from test_workflow import DATASET, TINY_CONFIG, _workdir

pytestmark = pytest.mark.slow

# --max-threads: the rules ask for 8 threads, the test node has 2 CPUs. Status checks start 2 s after a
# submission instead of the plugin's 40 s.
SLURM_ARGS = [
    "--workflow-profile",
    "profiles/slurm",
    "--max-threads",
    "2",
    "--latency-wait",
    "10",
    "--slurm-init-seconds-before-status-checks",
    "2",
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    if not sys.platform.startswith("linux"):
        pytest.skip("the SLURM test cluster needs Linux")
    try:
        install_slurm()
    except ClusterUnavailable as error:
        pytest.skip(f"no SLURM test cluster: {error}")
    local = LocalSlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        try:
            local.start()
        except ClusterUnavailable as error:
            pytest.skip(f"the SLURM test cluster did not start: {error}")
        yield local
    finally:
        local.stop()


def _env(cluster: LocalSlurmCluster) -> dict[str, str]:
    """The submitting shell: the venv first on PATH (jobs inherit it), the test cluster, account and partition."""
    env = dict(cluster.env)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(ABC_SLURM_ACCOUNT=ACCOUNT, ABC_SLURM_PARTITION=PARTITION, ABC_SLURM_GPU_PARTITION=PARTITION)
    return env


def _snakemake(*args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", *SLURM_ARGS, *args]


def _run(cluster: LocalSlurmCluster, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        _snakemake(*args), cwd=workdir, env=_env(cluster), capture_output=True, text=True, timeout=600, check=False
    )


def _declared(cluster: LocalSlurmCluster, workdir: Path) -> dict[str, dict[str, int]]:
    """Rule -> threads, mem_mb, runtime (min) as the dry run of the same command plans them."""
    proc = _run(cluster, workdir, "-n", "--cores", "2")  # a dry run is local: without --cores, 1 thread per job
    assert proc.returncode == 0, proc.stderr[-3000:]
    declared = {}
    for block in re.split(r"\n(?=rule \w+:)", proc.stdout + proc.stderr)[1:]:
        rule = block.split(":")[0].split()[1]
        if rule == "all":  # no command: never submitted
            continue
        resources = dict(re.findall(r"(\w+)=(\d+)", block.split("resources:")[1].splitlines()[0]))
        threads = re.search(r"threads: (\d+)", block)
        declared[rule] = {
            "threads": int(threads.group(1)) if threads else 1,
            "mem_mb": int(resources["mem_mb"]),
            "runtime": int(resources["runtime"]),
        }
    return declared


def _minutes(timelimit: str) -> int:
    """sacct's Timelimit ([D-]HH:MM:SS) in minutes."""
    days, _, clock = timelimit.rpartition("-")
    hours, minutes, _seconds = (int(v) for v in clock.split(":"))
    return int(days or 0) * 1440 + hours * 60 + minutes


def _rule(comment: str) -> str:
    return comment.removeprefix("rule_").split("_wildcards_")[0]


def test_workflow_runs_on_slurm_with_declared_resources_and_reruns_a_cancelled_job(
    cluster: LocalSlurmCluster, tmp_path: Path
) -> None:
    import anndata

    from abc_pipeline.raster import open_raster

    workdir = _workdir(tmp_path, TINY_CONFIG)
    declared = _declared(cluster, workdir)
    assert set(declared) == {"synth", "download", "assemble", "rasterize"}

    log = tmp_path / "snakemake.log"
    with open(log, "w") as out:
        run = subprocess.Popen(_snakemake(), cwd=workdir, env=_env(cluster), stdout=out, stderr=subprocess.STDOUT)
    try:
        assemble_log = workdir / "logs" / f"assemble_{DATASET}.log"
        deadline = time.time() + 900  # synth and download come first
        cancelled = None
        while time.time() < deadline and cancelled is None and run.poll() is None:
            running = [
                job for job in cluster.squeue() if _rule(job["comment"]) == "assemble" and job["state"] == "RUNNING"
            ]
            if running and assemble_log.exists():  # the rule's command has started inside the SLURM job
                cancelled = running[0]["id"]
                subprocess.run(["scancel", cancelled], env=cluster.env, check=True)
            time.sleep(0.2)
        run.wait(timeout=600)
    finally:
        if run.poll() is None:
            run.terminate()
            run.wait(timeout=60)
    output = log.read_text()
    assert cancelled is not None, f"assemble never ran on the cluster:\n{output[-4000:]}\n{cluster.describe()}"
    assert run.returncode == 0, output[-6000:]
    assert f"SLURM-job '{cancelled}' failed" in output  # reported, then submitted again (profile: retries 1)

    assert anndata.read_zarr(workdir / "results" / DATASET / "cells.zarr").n_obs > 3000
    for grid in ("section_2d", "reconstructed_3d"):
        raster = open_raster(workdir / "results" / DATASET / "raster" / f"{grid}.ome.zarr")
        assert len(raster.levels) == 2 and raster.image.shape[0] > 1
    leftovers = [p.name for p in (workdir / "results" / DATASET).iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left behind: {leftovers}"

    jobs = cluster.sacct("JobID", "Comment", "State", "ReqMem", "ReqCPUS", "Timelimit", "Account", "Partition")
    jobs = [job for job in jobs if job["Comment"].startswith("rule_")]
    by_rule: dict[str, list[dict[str, str]]] = {}
    for job in jobs:
        by_rule.setdefault(_rule(job["Comment"]), []).append(job)
    assert {rule: len(rows) for rule, rows in by_rule.items()} == {
        "synth": 1,
        "download": 1,
        "assemble": 2,
        "rasterize": 2,
    }
    assert [job["State"].split()[0] for job in by_rule["assemble"]] == ["CANCELLED", "COMPLETED"]
    for rule, rows in by_rule.items():
        for job in rows:
            assert job["Account"] == ACCOUNT and job["Partition"] == PARTITION
            assert job["ReqMem"] == f"{declared[rule]['mem_mb']}M", (rule, job)
            assert int(job["ReqCPUS"]) == declared[rule]["threads"], (rule, job)
            assert _minutes(job["Timelimit"]) == declared[rule]["runtime"], (rule, job)
    assert declared["rasterize"]["threads"] == 2  # 8 asked, capped by --max-threads to the node's 2 CPUs
    assert _run(cluster, workdir, "-n").stdout.count("rule ") == 0  # nothing left to do


def test_job_over_its_memory_is_reported_and_succeeds_with_more_memory(
    cluster: LocalSlurmCluster, tmp_path: Path
) -> None:
    workdir = _workdir(tmp_path, TINY_CONFIG)
    target = f"resources/synthetic_release/releases/{TINY_CONFIG['release']}/manifest.json"
    # The job (Snakemake inside it plus the synthetic generator) needs a few hundred MB; 100 MB is too little.
    low = _run(cluster, workdir, target, "--retries", "0", "--set-resources", "synth:mem_mb=100")
    assert low.returncode != 0
    failed = re.search(r"SLURM-job '(\d+)' failed", low.stdout + low.stderr)
    assert failed, (low.stdout + low.stderr)[-4000:]
    steps = cluster.sacct("JobID", "State", "ReqMem")
    assert any(job["JobID"] == failed.group(1) and job["ReqMem"] == "100M" for job in steps)
    assert "exceeded memory limit" in (cluster.folder / "slurmd.log").read_text()
    assert not (workdir / target).exists()

    enough = _run(cluster, workdir, target, "--set-resources", "synth:mem_mb=2000")
    assert enough.returncode == 0, (enough.stdout + enough.stderr)[-4000:]
    assert (workdir / target).exists()
