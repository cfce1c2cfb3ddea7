"""One CPU for a test module and the processes it starts, shared by the modules that run the CLI
end to end: `from cpu_pin import one_cpu` (an autouse fixture, so importing it is using it).

`refilled.training.loop.set_cpu_threads` gives torch one thread per CPU in the affinity mask. On a 2-core
machine shared with other torch jobs, two spinning OpenMP threads stall for seconds at a time
(tests/test_cli.py's chain took 8-80 s instead of 3 s); with one CPU in the mask every run uses
one thread and the timings are stable. Restored afterwards for the other test modules."""

import os

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_cpu():
    if not hasattr(os, "sched_setaffinity"):
        yield
        return
    cpus, threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, {min(cpus)})
    torch.set_num_threads(1)
    try:
        yield
    finally:
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(threads)
