"""Engine ports: two engines launched close together never get the same port (an engine binds its port only
seconds after its launch, so "the first port that binds now" alone would hand it out twice)."""

from __future__ import annotations

import socket

from warmserve.worker.engines import free_port


def test_a_port_given_to_one_of_our_engines_is_skipped_even_while_it_is_still_unbound():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        base = s.getsockname()[1]
    # nothing listens on `base` yet, but an engine of ours was given it: the next one gets another port
    first = free_port(base)
    second = free_port(base, {first})
    assert first == base and second > first


def test_a_port_someone_else_holds_is_skipped():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        assert free_port(port) > port
