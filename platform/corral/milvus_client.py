"""How Corral opens a pymilvus client: one place for the channel options, since pymilvus
shares one gRPC channel per address and token among every client in a process and keeps
the options of the first client that opened it."""

from __future__ import annotations

from pymilvus import MilvusClient

# pymilvus 3 sends a keepalive ping every 10 s, on idle channels too. Milvus Lite's gRPC
# server keeps C-core's policy (a ping without data at most every 5 minutes) and, after a
# few early ones, answers with GOAWAY too_many_pings (within 90 s of idling, measured
# here); after that GOAWAY pymilvus's reconnect of the shared channel can fail too, so
# every client of that server raised "Fail connecting to server" (milvus-lite issue 334;
# CI hit it). A ping every 5 minutes and 10 seconds is within Lite's policy and Milvus
# server's (5 s).
GRPC_OPTIONS = {"grpc.keepalive_time_ms": 310_000}


def open_client(uri: str, *, token: str = "", timeout_s: float | None = None) -> MilvusClient:
    """A pymilvus client with Corral's channel options; every client should come from here."""
    return MilvusClient(uri=uri, token=token, timeout=timeout_s, grpc_options=GRPC_OPTIONS)
