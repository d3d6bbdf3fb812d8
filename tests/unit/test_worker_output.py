"""The worker's output batching: whole lines, in the order each stream was written."""

from __future__ import annotations

import pickle
import socket
from collections.abc import Iterator

import pytest

from burla.node_agent.worker_shim import Channel, Output
from burla.schemas import messages as m
from burla.schemas import worker as proto


@pytest.fixture
def pair() -> Iterator[tuple[Output, socket.socket]]:
    ours, theirs = socket.socketpair()
    output = Output(Channel(ours))
    output.job_id = "job"
    yield output, theirs
    ours.close()
    theirs.close()


def sent(sock: socket.socket) -> list[tuple[int, int, str]]:
    message = proto.recv(sock)
    assert message is not None
    header, blobs = message
    assert header["kind"] == proto.LOGS and header["job_id"] == "job"
    entries: list[tuple[int, int, str]] = pickle.loads(blobs[0])
    return entries


def test_a_line_split_across_reads_stays_whole_and_in_order(pair: tuple[Output, socket.socket]) -> None:
    output, theirs = pair
    output.index = 0
    output.write(m.STDOUT, "C puts from 0")  # a pipe read can end anywhere, even mid-line

    def drain() -> None:  # the rest of the line is still in the pipe when the call returns
        output.write(m.STDOUT, "\n")

    output.before_end = drain
    output.end_lease()
    assert sent(theirs) == [(0, m.STDOUT, "C puts from 0\n")]


def test_pieces_written_by_python_and_by_fd_1_join_in_order(pair: tuple[Output, socket.socket]) -> None:
    output, theirs = pair
    output.index = 3
    output.write(m.STDOUT, "progress: ")
    output.write(m.STDERR, "warning\n")
    output.write(m.STDOUT, "50%\nand a tail")
    output.end_lease()
    assert sent(theirs) == [
        (3, m.STDERR, "warning\n"),
        (3, m.STDOUT, "progress: 50%\n"),
        (3, m.STDOUT, "and a tail"),
    ]


def test_a_line_is_tagged_with_the_input_running_when_it_completes(pair: tuple[Output, socket.socket]) -> None:
    output, theirs = pair
    output.index = 0
    output.write(m.STDOUT, "first ")
    output.index = 1
    output.write(m.STDOUT, "second\n")
    output.flush()
    assert sent(theirs) == [(1, m.STDOUT, "first second\n")]
