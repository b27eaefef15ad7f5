"""Starting the ranks: the process launcher behind `dist-ft launch` (torchrun's elastic agent), also used by
`dist-ft demo`, and the recipes shipped inside the package.

Imports neither cli.py nor demo.py (both import this); torch is imported only when a launch starts.
"""

from __future__ import annotations

import os
import sys
import time
from importlib import resources
from pathlib import Path

from .config import RecipeError


def packaged_recipe(name: str) -> Path:
    """A recipe shipped in dist_ft/recipes/ (demo.yaml, ...), wherever the package is installed."""
    return Path(str(resources.files("dist_ft") / "recipes" / name))


def _is_this_machine(host: str) -> bool:
    """Whether `host` names an address of this machine (network namespace): one we can bind to."""
    import socket

    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        return False
    for family, _, _, _, sockaddr in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.bind((sockaddr[0], 0))
                return True
        except OSError:
            continue
    return False


def _torchrun_sees_host(host: str) -> bool:
    try:
        from torch.distributed.elastic.rendezvous.utils import _matches_machine_hostname
    except ImportError:
        return False
    try:
        return _matches_machine_hostname(host)
    except OSError:  # this machine's own hostname does not resolve (a container, a namespace): it cannot match
        return False


def _route_address(host: str, port: int) -> str | None:
    """This machine's address on the route to `host` (a UDP connect sends nothing, it only picks the route)."""
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((host, port))
            addr = sock.getsockname()[0]
    except OSError:
        return None
    return None if addr.startswith("127.") else addr


def launch(recipe_path: str, overrides: list[str], *, nproc_per_node: int, nnodes: int = 1, node_rank: int = 0,
           rdzv_endpoint: str | None = None, max_restarts: int = 0, shutdown_timeout: int = 120,
           local_addr: str | None = None, read_timeout: int = 60, rdzv_id: str | None = None,
           output_dir: str | None = None, command: str = "train") -> int:
    """Start `nproc_per_node` ranks of `dist-ft train` (or `command`: doctor) through torchrun's elastic agent;
    return the exit status."""
    from torch.distributed.run import get_args_parser, run

    from .distributed.topology import free_port

    argv = [f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}", f"--max-restarts={max_restarts}"]
    if nnodes > 1:
        if not rdzv_endpoint:
            raise RecipeError(["--rdzv-endpoint HOST:PORT is needed with --nnodes > 1"], "command line")
        argv += [f"--node-rank={node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                 f"--rdzv-id={rdzv_id or 'dist-ft-' + Path(recipe_path).stem}"]
        host, port = rdzv_endpoint.rsplit(":", 1)
        # The agents' own store reads give up after the collective timeout too: on a partition they would
        # otherwise wait for TCP retransmissions long after the ranks have timed out.
        rdzv_conf = [f"read_timeout={read_timeout}"]
        if node_rank == 0 and _is_this_machine(host) and not _torchrun_sees_host(host):
            # torchrun hosts the rendezvous store only where the endpoint matches the hostname or its addresses;
            # an address of a second NIC (InfiniBand, a container network) is missed, and then nobody hosts it.
            rdzv_conf.append("is_host=true")
        # Each node advertises the address its ranks are reached at; torchrun's default, the hostname, may resolve
        # to a loopback or management address the other nodes cannot reach.
        local_addr = local_addr or _route_address(host, int(port))
        if local_addr:
            argv += [f"--local-addr={local_addr}"]
        argv += [f"--rdzv-conf={','.join(rdzv_conf)}"]
    else:
        argv += ["--standalone"] if rdzv_endpoint is None else [f"--rdzv-endpoint={rdzv_endpoint}"]
        argv += [f"--master-port={free_port()}"] if rdzv_endpoint is None else []
    parser = get_args_parser()
    options = {o for action in parser._actions for o in action.option_strings}
    if "--signals-to-handle" in options:  # torch >= 2.9; older torchrun lets SIGUSR1 kill the agent
        # Forward Slurm's usual pre-emption warning too: each rank then checkpoints and stops (signals.py).
        argv += ["--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"]
    if "--shutdown-timeout" in options:  # room for that checkpoint before the agent sends SIGKILL
        argv += [f"--shutdown-timeout={shutdown_timeout}"]
    argv += ["--module", "dist_ft", command, recipe_path, *overrides]
    import torch
    if not torch.cuda.is_available():
        # Share the cores between the ranks (torchrun would set 1 thread each and warn about it).
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from .distributed.watchdog import AgentWatchdog

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from .signals import EXIT_STOPPED
    from .telemetry.progress import stopped_since

    started = time.time()
    watchdog = AgentWatchdog(grace=5).start()  # the agent reacts in well under a second when it can
    try:
        run(parser.parse_args(argv))
    except SignalException as exc:  # the ranks got the same signal and checkpointed (or were killed after the wait)
        # torchrun keeps no exit status of ranks it signalled: the run's own log says whether they checkpointed.
        saved = output_dir is not None and stopped_since(Path(output_dir), started) is not None
        print(f"[dist_ft] launcher received {exc.sigval.name}: the ranks were asked to checkpoint and stop"
              + ("; they did" if saved else ""), file=sys.stderr)
        return EXIT_STOPPED if saved else 128 + int(exc.sigval)
    except ChildFailedError as exc:  # carries the failing rank and its error
        # A signal that reached the ranks but not this agent: they checkpointed and left with EXIT_STOPPED (a rank
        # still closing may then get the agent's SIGTERM; the checkpoint is written by then).
        codes = {f.exitcode for f in exc.failures.values()}
        if EXIT_STOPPED in codes and output_dir is not None and stopped_since(Path(output_dir), started):
            return EXIT_STOPPED
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        watchdog.stop()
    return 0
