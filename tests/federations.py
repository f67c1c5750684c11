"""What tests that drive a real local federation share: its Admin stub and the wait for members
online (the ``stopper`` fixture that stops them is in conftest.py)."""

from __future__ import annotations

from cipherhive.demo.federation import LocalFederation
from cipherhive.v1 import federation_pb2 as pb
from cipherhive.v1 import federation_pb2_grpc as pb_grpc


def admin(fed: LocalFederation) -> pb_grpc.AdminStub:
    return pb_grpc.AdminStub(fed.admin_channel())


def wait_online(fed: LocalFederation, count: int) -> None:
    """Until at least ``count`` members are online (joined and watching)."""
    fed.wait_for(
        lambda: sum(n.online for n in admin(fed).ListNodes(pb.ListNodesRequest(), timeout=10).nodes) >= count,
        90,
        f"{count} nodes online",
    )
