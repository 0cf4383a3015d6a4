"""TCP request/response latency (1-byte ping-pong) and connection rate, with
bench/netprog.py in the guest against its echo server on the host side."""

import json

from ..common import PYTHON, NETPROG, last_line, run


def guest_netprog(ctx, *args, timeout):
    stack = ctx.stack
    result = run([PYTHON, NETPROG, *map(str, args)], ns=stack.guest_ns, timeout=timeout)
    if result.returncode is None:
        raise RuntimeError(f"netprog {args[0]} gave no result within {timeout} s")
    if result.returncode != 0:
        raise RuntimeError(f"netprog {args[0]}: {last_line(result.stderr)}")
    return json.loads(result.stdout)


def request_response(ctx):
    out = guest_netprog(ctx, "rr", ctx.stack.gateway, ctx.echo_port, ctx.duration,
                        timeout=ctx.duration + 30)
    return {"median_us": out["median_us"], "p99_us": out["p99_us"],
            "round_trips": out["count"], "percentiles_us": out["percentiles_us"]}


def connection_rate(ctx):
    out = guest_netprog(ctx, "connrate", ctx.stack.gateway, ctx.echo_port, ctx.duration,
                        timeout=ctx.duration + 30)
    if out["ok"] == 0:
        raise RuntimeError(f"no connection succeeded ({', '.join(out['errors'])})")
    return {"per_second": out["per_second"], "failed": out["failed"]}


WORKLOADS = [
    ("tcp_rr", request_response, True),
    ("conn_rate", connection_rate, True),
]
