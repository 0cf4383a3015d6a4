"""TCP bulk transfer with iperf3: guest->host, host->guest (-R), 1 and 4 streams,
host->guest through each stack's port forward, and one stream each way over IPv6
(to the host's ::1 at the stack's ``gateway6``)."""

import time

from .. import iperf
from ..common import free_port, spawn, stop
from ..stacks import GUEST_PORT


def bulk(ctx, reverse, streams):
    stack = ctx.stack
    try:
        end, cpu, relay = iperf.client(stack.guest_ns, stack.gateway, ctx.iperf.port,
                                       ctx.duration, reverse=reverse, streams=streams,
                                       pid=stack.pid, relay_pid=stack.relay_pid)
    except Exception:
        ctx.iperf.restart()
        raise
    return iperf.bulk_metrics(end, cpu, relay, stack.relay_pid == stack.pid)


def port_forward(ctx):
    """iperf3 server in the guest, client on the host side through the stack's forward."""
    stack = ctx.stack
    ns, addr, port = stack.forward()
    server = spawn(["iperf3", "-s", "-p", str(GUEST_PORT)], ns=stack.guest_ns)
    try:
        time.sleep(0.3)
        end, cpu, relay = iperf.client(ns, addr, port, ctx.duration, pid=stack.pid,
                                       relay_pid=stack.relay_pid, retries=3)
    finally:
        stop(server)
    return iperf.bulk_metrics(end, cpu, relay, stack.relay_pid == stack.pid)


def bulk6(ctx, reverse):
    """One stream over IPv6: an iperf3 server on the host side's ::1 for this run."""
    stack = ctx.stack
    stack.ipv6_ready()
    port = 5202 if stack.host_ns else free_port()
    server = iperf.IperfServer(stack.host_ns, stack.server_addr6, port).start()
    try:
        end, cpu, relay = iperf.client(stack.guest_ns, stack.gateway6, port, ctx.duration,
                                       reverse=reverse, pid=stack.pid,
                                       relay_pid=stack.relay_pid, retries=3)
    finally:
        server.stop()
    return iperf.bulk_metrics(end, cpu, relay, stack.relay_pid == stack.pid)


WORKLOADS = [
    ("tcp_up_1", lambda ctx: bulk(ctx, reverse=False, streams=1), True),
    ("tcp_down_1", lambda ctx: bulk(ctx, reverse=True, streams=1), True),
    ("tcp_up_4", lambda ctx: bulk(ctx, reverse=False, streams=4), True),
    ("tcp_down_4", lambda ctx: bulk(ctx, reverse=True, streams=4), True),
    ("port_forward", port_forward, True),
    ("tcp6_up_1", lambda ctx: bulk6(ctx, reverse=False), True),
    ("tcp6_down_1", lambda ctx: bulk6(ctx, reverse=True), True),
]
