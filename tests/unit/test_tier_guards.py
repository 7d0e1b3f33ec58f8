import socket

import pytest

from tests.unit.conftest import UnitTierViolation


def test_ray_init_is_forbidden_in_unit_tier() -> None:
    import ray

    with pytest.raises(UnitTierViolation, match=r"ray\.init"):
        ray.init()


def test_inet_sockets_are_forbidden_in_unit_tier() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(UnitTierViolation):
            s.bind(("127.0.0.1", 0))
    finally:
        s.close()
