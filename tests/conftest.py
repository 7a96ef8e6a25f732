"""Shared fixtures."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from ppl_genmodels.models.ppca import PPCA


PROGRAMS = Path(__file__).resolve().parent / "pyro_programs"


def pyro_program(name: str):
    """One of the Pyro programs of ``tests/pyro_programs``, imported from its file (they are no package)."""
    spec = importlib.util.spec_from_file_location(f"pyro_programs_{name}", PROGRAMS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_ppca(n: int = 7, seed: int = 0):
    """A float64 PPCA (5-D data, 2-D latent, sigma 0.5) with random W, mu and ``n`` datapoints drawn from it."""
    torch.manual_seed(seed)
    model = PPCA(5, 2).double()
    with torch.no_grad():
        model.W.copy_(torch.randn(5, 2, dtype=torch.float64))
        model.mu.copy_(torch.randn(5, dtype=torch.float64))
        model.log_sigma.fill_(math.log(0.5))
    x, _ = model.sample_data(n)
    return model, x


@pytest.fixture
def ppca():
    return make_ppca(7)


@pytest.fixture
def one_thread():
    """Run a test with one intra-op thread: on tiny tensors, threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(argv) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit status, stdout, stderr)."""
    import contextlib
    import io

    from ppl_genmodels import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def table_rows(text: str) -> dict[str, list[str]]:
    """The rows of a printed table, keyed by their first word."""
    return {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
