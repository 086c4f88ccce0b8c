"""``ds-accel launch``: the exact ``deepspeed`` command each node of a job runs.

One launcher process per node (``srun --ntasks-per-node=1``) computes its node's command from the
SLURM environment and ``exec``s it, so no node needs ssh to another: DeepSpeed's ``--no_ssh`` mode
starts this node's ranks locally, with the node rank given. DeepSpeed 0.19 still reads the list of
nodes from a hostfile in that mode (without one it falls back to ``localhost`` and refuses
``--num_nodes`` > 1), so each node also writes the job's hostfile to its own temp dir.

    deepspeed --hostfile H --num_nodes N --num_gpus G --node_rank R --master_addr A --master_port P
              --no_ssh launch/train.py --config CFG [--resume] [extra args]

``--resume`` is added when the run already has a checkpoint pointer
(``<output_dir>/checkpoints/latest``), so a requeued job continues where it stopped. The master port
is ``29500 + job_id % 1000``: every node derives the same one, and two jobs sharing a node rarely
collide. With ``--hostfile`` (no SLURM) the single ``deepspeed --hostfile`` command is built instead,
for DeepSpeed's own ssh/pdsh launch.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import latest
from .config import REPO_ROOT, ConfigError, config_path

TRAIN_SCRIPT = REPO_ROOT / "launch" / "train.py"
BASE_PORT = 29500


@dataclass(frozen=True)
class Host:
    name: str
    slots: int  # GPUs (ranks) on this host


@dataclass(frozen=True)
class Cluster:
    """The machines of one job, in node-rank order; node 0 is the rendezvous master."""

    hosts: tuple[Host, ...]
    master_port: int

    @property
    def master_addr(self) -> str:
        return self.hosts[0].name

    @property
    def world_size(self) -> int:
        return sum(h.slots for h in self.hosts)


@dataclass(frozen=True)
class NodeLaunch:
    """What one node runs, and the rendezvous it joins."""

    node_rank: int
    host: str
    master_addr: str
    master_port: int
    nnodes: int
    gpus_per_node: int
    world_size: int
    command: tuple[str, ...]

    def describe(self) -> str:
        return (f"# node {self.host}: NODE_RANK={self.node_rank} NNODES={self.nnodes} "
                f"GPUS_PER_NODE={self.gpus_per_node} WORLD_SIZE={self.world_size} "
                f"MASTER_ADDR={self.master_addr} MASTER_PORT={self.master_port}")


_TOKEN = r"(?:[^,\[\]\s]+|\[[^\[\]]+\])+"
_NODELIST = re.compile(rf"{_TOKEN}(?:[,\s]+{_TOKEN})*")
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    """"01-03,7" -> 01 02 03 7: each range is zero-padded to the width of its lower bound, as Slurm does."""
    out = []
    for item in ranges.split(","):
        m = _RANGE.fullmatch(item)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ConfigError(f"SLURM_JOB_NODELIST: cannot expand {nodelist!r}: bad range {item!r} in "
                              f"[{ranges}]; expected numbers or lo-hi with lo <= hi")
        lo, hi, width = int(m.group(1)), int(m.group(2) or m.group(1)), len(m.group(1))
        out += [f"{n:0{width}d}" for n in range(lo, hi + 1)]
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a Slurm hostlist, in the order ``scontrol show hostnames`` prints them.

    Comma- or space-separated items, each a name with any number of bracketed range lists
    ("gpu[01-03,07]", "rack[1-2]-n[1-4]", "a1"); several brackets expand leftmost-outermost.
    """
    text = nodelist.strip()
    if not _NODELIST.fullmatch(text):
        raise ConfigError(f"SLURM_JOB_NODELIST: cannot expand {nodelist!r}; expected a Slurm hostlist "
                          "such as gpu[01-04,07],cpu5")
    hosts = []
    for token in re.findall(_TOKEN, text):
        pieces = re.split(r"\[([^\]]*)\]", token)  # odd positions hold the bracket contents
        choices = [_expand_ranges(p, nodelist) if i % 2 else [p] for i, p in enumerate(pieces)]
        hosts += ["".join(parts) for parts in itertools.product(*choices)]
    return hosts


def parse_hostfile(text: str, source: str = "--hostfile") -> tuple[Host, ...]:
    """DeepSpeed's hostfile format: one ``name slots=N`` per line; ``#`` starts a comment."""
    hosts: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if not m or int(m.group(2)) < 1:
            raise ConfigError(f"{source}: line {number} {raw.strip()!r} is not 'hostname slots=N' with N >= 1")
        if m.group(1) in hosts:
            raise ConfigError(f"{source}: host {m.group(1)} is listed twice (line {number}); list each host once")
        hosts[m.group(1)] = int(m.group(2))
    if not hosts:
        raise ConfigError(f"{source}: no hosts; write one 'hostname slots=N' line per node")
    return tuple(Host(name, slots) for name, slots in hosts.items())


def hostfile_text(cluster: Cluster) -> str:
    return "".join(f"{h.name} slots={h.slots}\n" for h in cluster.hosts)


def default_master_port(job_id: int | None) -> int:
    return BASE_PORT + (job_id % 1000 if job_id is not None else 0)


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}: expected an integer, got {value!r}") from None


def slurm_cluster(env: Mapping[str, str], gpus_per_node: int | None = None,
                  master_port: int | None = None) -> Cluster:
    """The job's nodes from SLURM_JOB_NODELIST, checked against SLURM_NNODES.

    GPUs per node: ``gpus_per_node`` if given, else SLURM_GPUS_ON_NODE (set when the job asks for
    GPUs with --gpus-per-node or --gres).
    """
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ConfigError("SLURM_JOB_NODELIST: not set; run inside a SLURM allocation (sbatch/salloc/srun) "
                          "or pass --hostfile")
    names = expand_nodelist(nodelist)
    nnodes = _env_int(env, "SLURM_NNODES") or _env_int(env, "SLURM_JOB_NUM_NODES")
    if nnodes is not None and nnodes != len(names):
        raise ConfigError(f"SLURM_NNODES: {nnodes} nodes, but SLURM_JOB_NODELIST={nodelist!r} lists "
                          f"{len(names)}; the hostlist expansion and SLURM disagree")
    if len(set(names)) != len(names):
        raise ConfigError(f"SLURM_JOB_NODELIST: {nodelist!r} names a host twice")
    gpus = gpus_per_node if gpus_per_node is not None else _env_int(env, "SLURM_GPUS_ON_NODE")
    if gpus is None or gpus < 1:
        raise ConfigError("--gpus-per-node: SLURM_GPUS_ON_NODE is not set (the job did not request GPUs "
                          "with --gpus-per-node/--gres); pass --gpus-per-node N")
    port = master_port if master_port is not None else default_master_port(_env_int(env, "SLURM_JOB_ID"))
    return Cluster(tuple(Host(name, gpus) for name in names), port)


def train_args(config: str, extra: Sequence[str], resume: bool) -> list[str]:
    """Arguments of ``launch/train.py``: the config, the pass-through args, ``--resume`` when asked."""
    args = ["--config", config, *extra]
    return args + ["--resume"] if resume and "--resume" not in extra else args


def has_checkpoint(output_dir: str | os.PathLike) -> bool:
    return latest(Path(output_dir) / "checkpoints") is not None


def run_output_dir(config: str, extra: Sequence[str]) -> Path:
    """``run.output_dir`` of the config, with the ``--set`` overrides among the pass-through args."""
    from .config import load

    sets = argparse.ArgumentParser(add_help=False)
    sets.add_argument("--set", action="append", default=[])
    sets.add_argument("--config")
    known, _ = sets.parse_known_args(list(extra))
    if known.config is not None:
        raise ConfigError("launch: give --config before '--', not among the training args")
    return Path(load(config_path(config), known.set).run.output_dir)


def node_launches(cluster: Cluster, hostfile: str | os.PathLike, script_args: Sequence[str]) -> list[NodeLaunch]:
    """Every node's command, node rank = position in the host list."""
    gpus = {h.slots for h in cluster.hosts}
    if len(gpus) != 1:
        raise ConfigError("--gpus-per-node: per-node launch needs the same GPU count on every node")
    (g,) = gpus
    n = len(cluster.hosts)
    launches = []
    for rank, host in enumerate(cluster.hosts):
        cmd = ("deepspeed", "--hostfile", str(hostfile), "--num_nodes", str(n), "--num_gpus", str(g),
               "--node_rank", str(rank), "--master_addr", cluster.master_addr,
               "--master_port", str(cluster.master_port), "--no_ssh", str(TRAIN_SCRIPT), *script_args)
        launches.append(NodeLaunch(rank, host.name, cluster.master_addr, cluster.master_port, n, g,
                                   cluster.world_size, cmd))
    return launches


def hostfile_command(hostfile: str | os.PathLike, cluster: Cluster, script_args: Sequence[str]) -> tuple[str, ...]:
    """One command for the whole job: DeepSpeed reaches the other hosts over ssh/pdsh itself."""
    return ("deepspeed", "--hostfile", str(hostfile), "--master_addr", cluster.master_addr,
            "--master_port", str(cluster.master_port), str(TRAIN_SCRIPT), *script_args)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def cmd_launch(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> int:
    resume = has_checkpoint(run_output_dir(args.config, args.train_args))
    script_args = train_args(args.config, args.train_args, resume)
    if args.hostfile is not None:
        path = Path(args.hostfile)
        if not path.is_file():
            raise ConfigError(f"--hostfile: {path} not found; write one 'hostname slots=N' line per node")
        port = args.master_port if args.master_port is not None else BASE_PORT
        cluster = Cluster(parse_hostfile(path.read_text(), str(path)), port)
        command = hostfile_command(path, cluster, script_args)
        print(f"# {len(cluster.hosts)} nodes, WORLD_SIZE={cluster.world_size}, MASTER_ADDR={cluster.master_addr} "
              f"MASTER_PORT={cluster.master_port}\n{shlex.join(command)}", flush=True)
        if not args.dry_run:
            os.execvp(command[0], command)
        return 0
    cluster = slurm_cluster(env, args.gpus_per_node, args.master_port)
    hostfile = Path(args.hostfile_dir or tempfile.gettempdir()) / f"ds_accel-{env.get('SLURM_JOB_ID', 'local')}.hostfile"
    launches = node_launches(cluster, hostfile, script_args)
    if args.dry_run:
        print(f"# hostfile {hostfile} (written by each node before it starts):")
        print("".join(f"#   {line}\n" for line in hostfile_text(cluster).splitlines()), end="")
        for launch in launches:
            print(f"{launch.describe()}\n{shlex.join(launch.command)}")
        return 0
    node = _env_int(env, "SLURM_NODEID")
    if node is None or not 0 <= node < len(launches):
        raise ConfigError(f"SLURM_NODEID: {env.get('SLURM_NODEID')!r} is not a node of this job; start the "
                          "launcher with srun (one task per node), or use --dry-run to print every node's command")
    hostfile.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(hostfile, hostfile_text(cluster))
    launch = launches[node]
    print(f"{launch.describe()}\n{shlex.join(launch.command)}", flush=True)
    os.execvp(launch.command[0], launch.command)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "launch", help="run this node's deepspeed command (SLURM or a hostfile); --dry-run prints all nodes'",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default", help="run config, as for train (default: default)")
    p.add_argument("--gpus-per-node", type=int, default=None, metavar="G",
                   help="GPUs per SLURM node (default: SLURM_GPUS_ON_NODE); a hostfile gives its own slots")
    p.add_argument("--master-port", type=int, default=None, metavar="P",
                   help=f"rendezvous port (default: {BASE_PORT} + SLURM_JOB_ID %% 1000)")
    p.add_argument("--hostfile", default=None, metavar="PATH",
                   help="DeepSpeed hostfile ('host slots=N' lines): one ssh-launched command instead of SLURM")
    p.add_argument("--hostfile-dir", default=None, metavar="DIR",
                   help="where each SLURM node writes the job's hostfile (default: $TMPDIR or /tmp)")
    p.add_argument("--dry-run", action="store_true", help="print every node's command and exit")
    p.add_argument("train_args", nargs="*", metavar="-- TRAIN_ARGS",
                   help="passed to launch/train.py after --config (e.g. -- --set run.save_every=500)")
    p.set_defaults(func=cmd_launch)
