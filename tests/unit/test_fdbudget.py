"""The descriptor budget: what the guest may hold, and what happens at its end."""

import dpkt

import framebuild as fb
from arcbox_net.fdbudget import PRESSURE, RESERVE, FdBudget

from .test_tcp_nat_unit import nat, syn  # noqa: F401  (the fixture)
from .test_udp_nat import Harness


def test_the_budget_keeps_the_reserve_and_what_was_open_at_start():
    budget = FdBudget(limit=1024, baseline=20)
    assert budget.capacity == 1024 - 20 - RESERVE
    held = [0]
    budget.add_user(lambda: held[0])
    assert budget.room() == budget.capacity and not budget.under_pressure()
    held[0] = int(PRESSURE * budget.capacity)
    assert budget.under_pressure()
    held[0] = budget.capacity
    assert budget.room() == 0
    assert budget.to_json() == {"capacity": budget.capacity, "in_use": budget.capacity}
    assert FdBudget().room() > 10**9 and FdBudget().to_json()["capacity"] is None


def test_for_process_reads_the_limit():
    budget = FdBudget.for_process()
    assert 0 <= budget.capacity < float("inf")


def test_a_syn_beyond_the_budget_gets_a_reset_and_no_host_socket(nat):  # noqa: F811
    nat.fd_budget.capacity = 2
    nat.fd_budget.add_user(lambda: len(nat.connections))
    for port in (40001, 40002):
        nat.dispatcher.frames_received([syn(sport=port)])
    nat.dispatcher.link.sent.clear()
    nat.dispatcher.frames_received([syn(sport=40003)])
    (reply,) = [fb.parse(f) for f in nat.dispatcher.link.sent]
    assert reply.data.data.flags & dpkt.tcp.TH_RST
    assert nat.drops["tcp-fd-exhausted"] == 1 and len(nat.reactor.tcpClients) == 2


def test_udp_flows_make_room_when_descriptors_run_short():
    h = Harness(udp_timeout=60.0)
    budget = h.nat.fd_budget
    budget.capacity = 4
    budget.add_user(lambda: len(h.nat.table))
    for port in (5001, 5002, 5003):
        h.guest_sends(port, "203.0.113.10", 53, b"q")
        h.clock.advance(1)
    # Pressure (3 of 4): a flow idle for 15 s (a quarter of 60) goes first.
    h.clock.advance(15)
    h.guest_sends(5004, "203.0.113.10", 53, b"q")
    assert h.nat.drops["udp-fd-reaped"] == 3
    assert h.flow(5001, "203.0.113.10", 53) is None and h.flow(5004, "203.0.113.10", 53)
    # At the end of the budget with nothing idle: the least recently active flow makes way.
    for port in (5005, 5006, 5007):
        h.guest_sends(port, "203.0.113.10", 53, b"q")
    h.guest_sends(5008, "203.0.113.10", 53, b"q")
    assert h.nat.drops["udp-fd-evicted"] >= 1
    assert len(h.nat.table) <= 4 and h.flow(5008, "203.0.113.10", 53) is not None
    assert all(s.closed for s in h.sockets if h.nat.table.get(s.flow.key) is not s.flow)
