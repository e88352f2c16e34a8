"""launch/: local.sh process management with a stand-in trainer; the pod launchers' commands."""

from __future__ import annotations

import glob
import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_LAUNCH = os.path.join(_ROOT, "launch")
_CHILD_DIR = os.path.dirname(os.path.abspath(__file__))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def workdir(tmp_path):
    yield str(tmp_path)
    # Never leave a stand-in trainer running after a failed assertion.
    for path in glob.glob(os.path.join(str(tmp_path), "p*.json")):
        with open(path) as f:
            pid = json.load(f)["pid"]
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _env(workdir: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(
        PYTHONPATH=_CHILD_DIR,
        DSJ_MODULE="_launcher_child",
        WORKDIR=workdir,
        PYTHON=sys.executable,
        DEVICES="2",
        GRACE_S="2",
    )
    env.update(extra)
    return env


def _children(workdir: str) -> list[dict]:
    paths = sorted(glob.glob(os.path.join(workdir, "p*.json")))
    return [json.load(open(p)) for p in paths]


def _local(workdir: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [os.path.join(_LAUNCH, "local.sh"), *args],
        env=_env(workdir, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("script", ["local.sh", "tpu_pod.sh", "slurm_gpu.sbatch"])
def test_scripts_parse_and_document_variables(script) -> None:
    path = os.path.join(_LAUNCH, script)
    subprocess.run(["bash", "-n", path], check=True)
    header = open(path).read().split("set -euo pipefail")[0]
    assert "Variables" in header and "Usage" in header
    assert os.stat(path).st_mode & stat.S_IXUSR


def test_local_starts_n_processes_with_ids(workdir) -> None:
    result = _local(workdir, "3", "--config.train.steps=10", "--name=a b")
    assert result.returncode == 0, result.stderr
    children = _children(workdir)
    assert [c["process_id"] for c in children] == [0, 1, 2]
    assert {c["num_processes"] for c in children} == {3}
    coordinators = {c["coordinator"] for c in children}
    assert len(coordinators) == 1 and coordinators.pop().startswith("127.0.0.1:")
    for child in children:
        assert child["extra"] == ["--config.train.steps=10", "--name=a b"]
        assert child["config"] == os.path.join(_ROOT, "configs", "tiny.py")
        assert child["env"]["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
        assert child["env"]["JAX_PLATFORMS"] == "cpu"
        assert child["env"]["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo"
    # Process 0 talks to the terminal; the others to their log files.
    assert "child 0 started" in result.stdout and "child 1" not in result.stdout
    assert "child 2 started" in open(os.path.join(workdir, "logs", "process_2.log")).read()


def test_local_rejects_bad_process_count(workdir) -> None:
    for arg in ("0", "two"):
        result = _local(workdir, arg)
        assert result.returncode == 2 and "Usage" in result.stderr
    assert _local(workdir).returncode == 2
    assert not _children(workdir)


@pytest.mark.parametrize("mode", ["fail_one", "stubborn"])
def test_local_failure_stops_the_rest_and_propagates(workdir, mode) -> None:
    start = time.monotonic()
    result = _local(workdir, "3", CHILD_MODE=mode)
    assert result.returncode == 3, result.stderr
    assert "process 1 exited with status 3" in result.stderr
    assert "child 1 failing on purpose" in result.stderr  # The failed process's log tail.
    assert time.monotonic() - start < 20  # Not the survivors' 60 s sleep.
    children = _children(workdir)
    assert len(children) == 3 and not any(_alive(c["pid"]) for c in children)
    signalled = sorted(os.path.basename(p) for p in glob.glob(os.path.join(workdir, "*.signal")))
    # Survivors got SIGTERM first; stubborn ones ignored it and had to be SIGKILLed.
    assert signalled == ([] if mode == "stubborn" else ["p0.signal", "p2.signal"])


@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_local_forwards_signals(workdir, sig, status) -> None:
    launcher = subprocess.Popen(
        [os.path.join(_LAUNCH, "local.sh"), "2"],
        env=_env(workdir, CHILD_MODE="wait"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while len(_children(workdir)) < 2:
            assert time.monotonic() < deadline and launcher.poll() is None, "children not started"
            time.sleep(0.05)
        launcher.send_signal(sig)
        # The stand-in exits 0 on SIGTERM (saved and stopped) and 130 on SIGINT.
        assert launcher.wait(timeout=30) == status
    finally:
        if launcher.poll() is None:
            launcher.kill()
        launcher.communicate()
    for pid in (0, 1):
        with open(os.path.join(workdir, f"p{pid}.signal")) as f:
            assert f.read() == sig.name
    assert not any(_alive(c["pid"]) for c in _children(workdir))


def _fake_tool(bin_dir: str, name: str, body: str) -> None:
    path = os.path.join(bin_dir, name)
    with open(path, "w") as f:
        f.write("#!/usr/bin/env bash\n" + body)
    os.chmod(path, 0o755)


def test_tpu_pod_runs_one_command_on_all_workers(workdir, tmp_path) -> None:
    bin_dir = str(tmp_path / "bin")
    os.makedirs(bin_dir)
    argv_file = str(tmp_path / "gcloud_argv")
    _fake_tool(bin_dir, "gcloud", f'printf "%s\\0" "$@" > {shlex.quote(argv_file)}\n')
    env = _env(
        workdir,
        TPU_NAME="my-slice",
        ZONE="us-east5-a",
        REPO_DIR=_ROOT,
        PATH=bin_dir + os.pathsep + os.environ["PATH"],
    )
    result = subprocess.run(
        [os.path.join(_LAUNCH, "tpu_pod.sh"), "--config.train.steps=5", "--name=a b"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    argv = open(argv_file).read().split("\0")[:-1]
    assert argv[:5] == ["compute", "tpus", "tpu-vm", "ssh", "my-slice"]
    assert "--zone=us-east5-a" in argv and "--worker=all" in argv
    (command,) = [a[len("--command=") :] for a in argv if a.startswith("--command=")]
    # What each worker's shell runs: the flags must arrive intact, with no coordinator flags.
    subprocess.run(["bash", "-c", command], env=env, check=True, timeout=30)
    (child,) = _children(workdir)
    assert child["extra"] == ["--config.train.steps=5", "--name=a b"]
    assert child["coordinator"] is None and child["num_processes"] is None
    assert child["cwd"] == _ROOT and child["config"] == "configs/tiny.py"

    del env["TPU_NAME"]
    result = subprocess.run(
        [os.path.join(_LAUNCH, "tpu_pod.sh")], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0 and "TPU_NAME" in result.stderr


@pytest.mark.parametrize("tasks_per_node", [2, 1])
def test_slurm_sets_coordinator_ids_and_devices(workdir, tmp_path, tasks_per_node) -> None:
    bin_dir = str(tmp_path / "bin")
    os.makedirs(bin_dir)
    _fake_tool(bin_dir, "scontrol", 'printf "node-a\\nnode-b\\n"\n')
    # srun stand-in: every task of the allocation, with its SLURM_PROCID/SLURM_LOCALID.
    _fake_tool(
        bin_dir,
        "srun",
        """[[ $1 == --kill-on-bad-exit=1 ]] || exit 9; shift
per_node=$((SLURM_NTASKS / SLURM_JOB_NUM_NODES))
for ((t = 0; t < SLURM_NTASKS; t++)); do
    SLURM_PROCID=$t SLURM_LOCALID=$((t % per_node)) "$@" &
done
wait
""",
    )
    env = _env(
        workdir,
        PATH=bin_dir + os.pathsep + os.environ["PATH"],
        REPO_DIR=_ROOT,
        SLURM_JOB_NODELIST="node-[a-b]",
        SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_ID="1234",
        SLURM_NTASKS=str(2 * tasks_per_node),
        SLURM_GPUS_ON_NODE="4",
    )
    result = subprocess.run(
        [os.path.join(_LAUNCH, "slurm_gpu.sbatch"), "--name=a b"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    children = _children(workdir)
    assert [c["process_id"] for c in children] == list(range(2 * tasks_per_node))
    for child in children:
        assert child["coordinator"] == "node-a:11234"
        assert child["num_processes"] == 2 * tasks_per_node
        assert child["extra"] == ["--name=a b"]
        expected = str(child["process_id"] % 2) if tasks_per_node == 2 else "0,1,2,3"
        assert child["env"]["JAX_LOCAL_DEVICE_IDS"] == expected


def test_gke_jobset_is_consistent_and_its_command_runs(workdir) -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML (a flax/orbax dependency) parses the YAML")
    with open(os.path.join(_LAUNCH, "gke_jobset.yaml")) as f:
        jobset = yaml.safe_load(f)
    assert jobset["kind"] == "JobSet" and jobset["apiVersion"].startswith("jobset.x-k8s.io/")
    (job,) = jobset["spec"]["replicatedJobs"]
    spec = job["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] == spec["completions"]
    (container,) = spec["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert int(env["NUM_PROCESSES"]["value"]) == spec["parallelism"]
    assert "google.com/tpu" in container["resources"]["limits"]
    script = container["command"][2]
    assert "python -m deepseek_jax.train" in script
    # Run the container's command with the stand-in trainer and the env Kubernetes would set.
    script = script.replace("deepseek_jax.train", "_launcher_child")
    run_env = _env(
        workdir,
        JOBSET_NAME=jobset["metadata"]["name"],
        JOB_COMPLETION_INDEX="2",
        NUM_PROCESSES="4",
        CONFIG="configs/x.py",
        EXTRA_ARGS="--a=1 --b=2",
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
    )
    subprocess.run(["bash", "-c", script], env=run_env, check=True, timeout=30)
    (child,) = _children(workdir)
    name = jobset["metadata"]["name"]
    assert child["coordinator"] == f"{name}-slice-0-0.{name}:8476"
    assert (child["process_id"], child["num_processes"]) == (2, 4)
    assert child["extra"] == ["--a=1", "--b=2"]
