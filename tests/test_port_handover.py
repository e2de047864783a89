"""Ports are handed to child servers as bound sockets (`corral serve --fd`): nothing
picks a port, releases it and hopes the child gets it before another process does."""

from __future__ import annotations

import socket

import pytest

from corral.cli import build_parser
from corral.demo import listening_socket, serve_command


def test_the_port_stays_bound_until_the_child_has_it() -> None:
    with listening_socket() as sock:
        port = sock.getsockname()[1]
        assert port != 0
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))  # nobody else can take it meanwhile
        command = serve_command(sock)
        assert command[-2:] == ["--fd", str(sock.fileno())]
        assert build_parser().parse_args(command[3:]).fd == sock.fileno()
