"""`dist-ft doctor RECIPE`: about a minute on the real allocation before a long job, on every rank.

    dist-ft doctor RECIPE.yaml --nproc-per-node N [--nnodes M ...]   start the ranks (as dist-ft launch) and check
    torchrun ... -m dist_ft doctor RECIPE.yaml                       one rank of any launcher
    dist-ft slurm RECIPE.yaml --doctor ...                           the batch script runs it before training

The checks, one module each, cheapest first:

    world.py        rendezvous: the world that formed against the one asked for; separate worlds on one folder
    memory.py       each rank's free memory (device, or host and cgroup) against `dist-ft plan`'s need
    links.py        latency and bandwidth of every link between nodes; the backend's collectives at its sizes
    storage.py      the checkpoint filesystem: room, write / read / verify throughput, shared by every node
    signal_path.py  a stop signal on one rank becomes every rank's stop; the checkpoint fits the warning
    parity.py       one global batch: its loss over N ranks against one rank's
    report.py       the verdict line, the table, doctor.json (output_dir/doctor/)

Exit status 0 when nothing failed (warnings allowed), 1 when a check failed; the verdict names the check and the
rank or node to look at.
"""

from .run import run_doctor

__all__ = ["run_doctor"]
