"""Workloads, one module per kind. Each gives (id, function, every_mtu) entries.

A function takes the run's Context and returns {metric: value}. It raises
common.Unsupported (or any error) when the stack cannot do it: the report
then says n/a and why. ``every_mtu`` False: run at the first MTU only.
"""

from . import latency, scale, tcp_bulk, udp


def all_workloads(scale_sizes):
    return [*tcp_bulk.WORKLOADS, *latency.WORKLOADS, *udp.WORKLOADS,
            *scale.workloads(scale_sizes)]
