"""Ports are handed to child servers as bound sockets (`corral serve --fd`): nothing
picks a port, releases it and hopes the child gets it before another process does."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

import corral.cli.serve as serve_cli
from corral.cli import main
from corral.demo import listening_socket, serve_command


def test_the_port_stays_bound_until_the_child_has_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What `corral serve` would be handed, without serving.
    handed: list[serve_cli.ServeArgs] = []
    monkeypatch.setattr(serve_cli, "cmd_serve", lambda _s, args: handed.append(args))
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path))
    with listening_socket() as sock:
        port = sock.getsockname()[1]
        assert port != 0
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))  # nobody else can take it meanwhile
        command = serve_command(sock)
        assert command[-2:] == ["--fd", str(sock.fileno())]
        assert main(command[3:]) == 0
        assert handed[0].fd == sock.fileno()
