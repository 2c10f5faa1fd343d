"""The pieces that name a lost node without a cluster: the roll call in the job store
(``harness.failures.report_lost``), what counts as a peer's error, the exit status a node reports,
and the node wrapper's rendezvous check. The whole path runs on two nodes in test_multinode.py."""

import socket
import threading
import time

import pytest
import torch.distributed as dist

from harness import failures
from harness.cluster import node
from harness.exits import EXIT_CHECKPOINT, EXIT_HANG, EXIT_PEER_LOST, EXIT_PREEMPTED, combine_exit

HOSTS = ["n1", "n1", "n2", "n2", "n3", "n3"]


@pytest.fixture
def store():
    yield dist.HashStore()
    failures.stop()


def test_the_roll_call_names_the_ranks_that_did_not_answer_and_their_hosts(store, capsys):
    failures.start(store, 0, len(HOSTS), HOSTS)
    store.append(failures.ROLL_CALL_KEY, "1,")  # rank 1 answered; 2-5 never will
    t0 = time.monotonic()
    lost = failures.report_lost("Read error [10.0.0.12]:4242: Connection reset by peer.", wait_s=1.5)
    waited = time.monotonic() - t0
    assert lost == [2, 3, 4, 5]
    assert 1.5 <= waited < 1.5 + 2.0  # at least wait_s (the poll interval at 6 ranks is 1 s: 3 s)
    assert store.get(failures.ROLL_CALL_KEY).decode().split(",")[:2] == ["1", "0"]
    assert capsys.readouterr().err.splitlines() == [
        "error: lost: ranks 2-3 (host n2), 4-5 (host n3) did not answer the roll call within 3 s; after: "
        "Read error [10.0.0.12]:4242: Connection reset by peer."
    ]


def test_a_full_roll_call_returns_at_once_and_says_nothing(store, capsys):
    failures.start(store, 3, 4, HOSTS[:4])
    store.append(failures.ROLL_CALL_KEY, "0,1,2,")
    t0 = time.monotonic()
    assert failures.report_lost("anything", wait_s=30) == []
    assert store.get(failures.ROLL_CALL_OPEN).decode() == "3"
    assert time.monotonic() - t0 < 2 and capsys.readouterr().err == ""


def test_only_the_rank_that_opened_the_roll_call_reports(store, capsys):
    """Rank 1 saw the peer error first and opened it: rank 0, which also waits, prints nothing."""
    failures.start(store, 0, 4, HOSTS[:4])
    store.set(failures.ROLL_CALL_OPEN, "1")
    store.append(failures.ROLL_CALL_KEY, "1,")
    assert failures.report_lost("Connection closed by peer", wait_s=0.5) == [2, 3]
    assert capsys.readouterr().err == ""


def test_a_rank_blocked_in_a_collective_answers_from_its_watch_thread(store):
    """The first rank to see the error opens the roll call; another rank's main thread may be stuck in
    a collective with a live peer: its FailureWatch thread answers within its poll interval."""
    failures.start(store, 1, 2, ["n1", "n2"])  # this process plays rank 1, with its watch thread
    store.set(failures.ROLL_CALL_OPEN, "0")  # rank 0 opened it
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not store.check([failures.ROLL_CALL_KEY]):
        time.sleep(0.05)
    assert store.get(failures.ROLL_CALL_KEY).decode() == "1,"


class _GoneStore:
    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise dist.DistNetworkError("Connection reset by peer")

        return fail


def test_a_rank_that_cannot_reach_the_store_names_the_store_and_its_own_host(monkeypatch, capsys):
    monkeypatch.setenv("MASTER_ADDR", "n1")
    monkeypatch.setenv("MASTER_PORT", "29400")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(socket, "gethostname", lambda: "n2")
    failures.start(_GoneStore(), 2, 4, ["n1", "n1", "n2", "n2"])
    try:
        assert failures.report_lost("hang: phase step lasted 21.0 s after step 31") is None
    finally:
        failures.stop()
    assert capsys.readouterr().err.splitlines() == [
        "error: lost: the job store at n1:29400 does not answer host n2 (rank 2; ranks here: 2-3): this host "
        "is cut off, or the store's host is down; after: hang: phase step lasted 21.0 s after step 31"
    ]


@pytest.mark.parametrize(
    "error, peer",
    [
        (
            RuntimeError(
                "[../gloo/transport/tcp/pair.cc:537] Read error [10.0.0.2]:1: Connection reset by peer"
            ),
            True,
        ),
        (RuntimeError("[../pair.cc:553] Connection closed by peer [10.213.7.12]:54971"), True),
        (dist.DistNetworkError("failed to recv, got 0 bytes"), True),
        (RuntimeError("injected fault at step 4"), False),
        (OSError(28, "No space left on device"), False),
    ],
)
def test_peer_errors_are_told_from_a_rank_s_own(error, peer):
    assert failures.is_peer_error(error) is peer


def test_a_checkpoint_exception_wrapping_a_peer_error_is_one():
    class CheckpointException(BaseException):
        def __init__(self, failed):
            self.failures = failed

    wrapped = CheckpointException({1: (RuntimeError("Connection closed by peer [10.0.0.3]:5"), "tb")})
    assert failures.is_peer_error(wrapped)
    assert not failures.is_peer_error(CheckpointException({1: (OSError(5, "EIO"), "tb")}))


def test_a_node_reports_lost_ranks_over_the_statuses_they_caused():
    assert combine_exit(1, [EXIT_PEER_LOST, EXIT_CHECKPOINT]) == EXIT_PEER_LOST
    assert combine_exit(1, [EXIT_HANG, EXIT_PEER_LOST, 0]) == EXIT_PEER_LOST
    assert combine_exit(1, [EXIT_PREEMPTED, 0]) == EXIT_PREEMPTED


def test_the_rendezvous_check_waits_for_the_port_and_names_host_and_port_when_it_stays_shut():
    with socket.socket() as probe:  # a free port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    t0 = time.monotonic()
    error = node.reach_rendezvous(f"127.0.0.1:{port}", 1.0, node="n2")
    assert time.monotonic() - t0 >= 1.0
    assert error == (
        f"node n2 cannot reach the rendezvous at 127.0.0.1:{port} within 1 s (last error: "
        "ConnectionRefusedError: Connection refused); check that 127.0.0.1 resolves to its address from n2 "
        f"and that port {port} is open between the nodes (slurm.rdzv_port, slurm.rdzv_timeout_s)"
    )
    assert node.reach_rendezvous(f"n1:{port}", 1.0, node="n1") is None  # the head opens it itself

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    opened = threading.Timer(1.5, server.listen)  # the head's launcher starts a little later
    opened.start()
    try:
        assert node.reach_rendezvous(f"127.0.0.1:{server.getsockname()[1]}", 10.0, node="n2") is None
    finally:
        opened.join()
        server.close()
