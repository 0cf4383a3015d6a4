"""UDP: iperf3 at a fixed offered rate (loss, throughput), and DNS queries/s
against the stack's resolver for a name it answers locally."""

from .. import iperf
from ..common import PYTHON, NETPROG, Unsupported, last_line, run
from .latency import guest_netprog


def udp_iperf(ctx):
    stack = ctx.stack
    probe = run([PYTHON, NETPROG, "udpprobe", stack.gateway, str(ctx.echo_port)],
                ns=stack.guest_ns, timeout=15)
    if probe.returncode != 0:
        raise Unsupported(f"UDP through the gateway got no answer ({last_line(probe.stderr)})")
    # Datagrams that fit the MTU: no IP fragments (a stack may drop those).
    length = min(ctx.mtu - 28, 32000)
    try:
        end, _cpu, _relay = iperf.client(stack.guest_ns, stack.gateway, ctx.iperf.port,
                                         ctx.duration, udp_rate=ctx.udp_rate, length=length,
                                         pid=stack.pid)
    except Exception:
        ctx.iperf.restart()
        raise
    total = end["sum"]
    received = end.get("sum_received", {}).get("bits_per_second")
    if received is None:
        received = total["bits_per_second"] * (1 - total["lost_percent"] / 100)
    return {"received_mbps": received / 1e6, "loss_pct": total["lost_percent"]}


def dns_rate(ctx):
    stack = ctx.stack
    if stack.dns is None:
        raise Unsupported(stack.dns_reason)
    server, name = stack.dns
    out = guest_netprog(ctx, "dns", server, name, ctx.duration, timeout=ctx.duration + 30)
    if out["answered"] == 0:
        raise Unsupported(f"no answer for {name} from {server} "
                          f"({out['timeouts']} timeouts, {out['failed']} errors)")
    return {"per_second": out["per_second"], "unanswered": out["timeouts"] + out["failed"]}


WORKLOADS = [
    ("udp", udp_iperf, True),
    ("dns", dns_rate, True),
]
