"""Benchmark session setup: device choice, options, shared fixtures, the summary table and the JSON.

Without a GPU the Triton kernels can only run in Triton's CPU interpreter; TRITON_INTERPRET is read when the
kernels are decorated, so it is set here, before anything imports steermoe. CPU timings use one thread: on a
small shared CI machine, multi-threaded kernels stall whenever another process takes a core.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.report import Results, environment, summary_lines  # noqa: E402
from benchmarks.timing import DEVICE, copy_bandwidth_gbps  # noqa: E402

_RESULTS = pytest.StashKey[Results]()
_COPY_BYTES = {"cuda": 2**30, "cpu": 64 * 2**20}


def pytest_addoption(parser):
    group = parser.getgroup("steermoe benchmarks")
    group.addoption("--bench-sweep", choices=("auto", "small", "headline", "full"), default="auto",
                    help="op shapes: full (GPU default), headline (16x1500 x 1280, E=8, bf16) or small (CPU default)")
    group.addoption("--bench-out", metavar="DIR", default=None,
                    help="write the summary rows and environment to DIR/NAME.json, also while running")
    group.addoption("--bench-name", metavar="NAME", default="summary", help="the JSON's name in --bench-out")


def pytest_configure(config):
    out = config.getoption("--bench-out")
    config.stash[_RESULTS] = Results(os.path.join(out, f"{config.getoption('--bench-name')}.json") if out else None)


@pytest.fixture(scope="session", autouse=True)
def _one_cpu_thread():
    """CPU benchmarks run on one thread (restored afterwards, for tests sharing the session)."""
    threads = torch.get_num_threads()
    if DEVICE.type == "cpu":
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def results(pytestconfig, _one_cpu_thread) -> Results:
    res = pytestconfig.stash[_RESULTS]
    res.env.update(environment())
    return res


@pytest.fixture(scope="session")
def copy_gbps(results) -> float:
    """This device's measured copy bandwidth (GB/s, read + write): the ceiling achieved bandwidth is held to."""
    gbps = copy_bandwidth_gbps(_COPY_BYTES[DEVICE.type])
    results.env["copy_gbps"] = gbps
    return gbps


def pytest_sessionfinish(session):
    res = session.config.stash.get(_RESULTS, None)
    if res is not None and res.rows:
        res.save()


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    res = config.stash.get(_RESULTS, None)
    if res is None or not res.rows:
        return
    terminalreporter.section("steermoe benchmark summary")
    for line in summary_lines(res):
        terminalreporter.write_line(line)
