"""Guards of the demo that keep a second run from damaging the first."""

from __future__ import annotations

import os
import socket

import pytest

from collector.demo import DemoError, check_port_free, lock_workdir


def test_lock_workdir_held_elsewhere(tmp_path):
    first = lock_workdir(tmp_path)
    try:
        with pytest.raises(DemoError) as error:
            lock_workdir(tmp_path)
    finally:
        os.close(first)

    assert str(error.value) == (
        f"another demo is running in {tmp_path}: stop it, or start this one with "
        "--workdir DIR and --port N"
    )


def test_lock_workdir_free_again(tmp_path):
    os.close(lock_workdir(tmp_path))

    descriptor = lock_workdir(tmp_path)

    os.close(descriptor)
    assert (tmp_path / "demo.lock").is_file()


def test_port_in_use_rejected():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(DemoError) as error:
            check_port_free(port)

    assert str(error.value) == (
        f"port {port} on 127.0.0.1 is in use (Address already in use): "
        "start the demo with --port N"
    )


def test_free_port_accepted():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    check_port_free(port)
