"""Data-parallel FST training over 2 processes (jax.distributed, gloo CPU collectives) equals one
process: ``benchmarks/multiprocess.py --check`` as a test."""

from __future__ import annotations

import socket

import pytest

from benchmarks import multiprocess


def _can_listen_locally() -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            s.listen(1)
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _can_listen_locally(), reason="this platform cannot open a local TCP port, which "
                    "jax.distributed's coordinator and gloo need")
def test_two_processes_equal_one() -> None:
    r = multiprocess.check(timeout_s=240)
    assert r["collectives"] == "gloo" and r["devices"] == 2
    assert r["process_param_diff"] == 0  # the replicated parameters agree bit for bit
    assert r["loss_max_diff"] < multiprocess.LOSS_TOL, r
    assert r["param_max_diff"] < multiprocess.PARAM_TOL, r
    assert len(r["losses_2proc"]) == multiprocess.SHAPES["check"]["steps"]
