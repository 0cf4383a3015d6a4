"""latest.md (the table), and the PNG plots, from the driver's result dict."""

import os

STACK_LABELS = {"arcbox-net": "arcbox-net", "arcbox-net-2q": "arcbox-net --queues 2",
                "arcbox-net-nooffload": "arcbox-net (no offload)",
                "arcbox-net-nopoll": "arcbox-net (no busy-poll)",
                "arcbox-net-qemu": "arcbox-net via QEMU stream",
                "arcbox-net-qemu-dgram": "arcbox-net via QEMU dgram",
                "arcbox-net-qemu-dgram-qlen512": "arcbox-net via QEMU dgram, QEMU qlen 512",
                "arcbox-net-qemu-fd": "arcbox-net --fd via QEMU dgram",
                "arcbox-net-fd-vnet": "arcbox-net --fd --vnet-hdr",
                "libslirp-qemu": "libslirp via QEMU",
                "arcbox-net-rootlesskit": "arcbox-net via rootlesskit",
                "slirp4netns-rootlesskit": "slirp4netns via rootlesskit",
                "slirp4netns": "slirp4netns", "pasta": "pasta",
                "pasta-v6": "pasta (IPv6 rows, own host namespace)", "kernel": "kernel (veth)"}

#: Ratio columns: (stack, against, header), both from the same run.
RATIOS = [("arcbox-net", "slirp4netns", "arcbox-net / slirp4netns"),
          ("arcbox-net-2q", "slirp4netns", "--queues 2 / slirp4netns"),
          ("arcbox-net-nooffload", "slirp4netns", "no offload / slirp4netns"),
          ("arcbox-net-qemu", "slirp4netns", "via QEMU stream / slirp4netns"),
          ("arcbox-net-qemu-dgram", "slirp4netns", "via QEMU dgram / slirp4netns"),
          ("arcbox-net-qemu-fd", "slirp4netns", "--fd via QEMU / slirp4netns"),
          ("arcbox-net-fd-vnet", "slirp4netns", "--fd --vnet-hdr / slirp4netns"),
          ("arcbox-net-rootlesskit", "slirp4netns-rootlesskit",
           "via rootlesskit / slirp4netns via rootlesskit"),
          ("arcbox-net", "pasta-v6", "arcbox-net / pasta (IPv6)")]
#: The VM links against libslirp behind the same QEMU relay, idle and with the competitor.
for _mine, _short in (("arcbox-net-qemu", "stream"), ("arcbox-net-qemu-dgram", "dgram"),
                      ("arcbox-net-qemu-dgram-qlen512", "dgram qlen 512"),
                      ("arcbox-net-qemu-fd", "--fd")):
    RATIOS += [(_mine, "libslirp-qemu", f"via QEMU {_short} / libslirp"),
               (f"{_mine}+hog", "libslirp-qemu+hog", f"via QEMU {_short} / libslirp, + hog")]


def stack_label(stack):
    if stack.endswith("+hog"):
        return f"{stack_label(stack[:-4])} + CPU hog"
    return STACK_LABELS.get(stack, stack)


#: Table rows in order: (workload, metric, label, unit). Scale rows are added per N.
ROWS = [
    ("tcp_up_1", "gbps", "TCP guest→host, 1 stream", "Gbit/s"),
    ("tcp_down_1", "gbps", "TCP host→guest, 1 stream", "Gbit/s"),
    ("tcp_up_4", "gbps", "TCP guest→host, 4 streams", "Gbit/s"),
    ("tcp_down_4", "gbps", "TCP host→guest, 4 streams", "Gbit/s"),
    ("port_forward", "gbps", "TCP port forward host→guest", "Gbit/s"),
    ("tcp6_up_1", "gbps", "TCP over IPv6 guest→host, 1 stream", "Gbit/s"),
    ("tcp6_down_1", "gbps", "TCP over IPv6 host→guest, 1 stream", "Gbit/s"),
    ("tcp_rr", "median_us", "TCP 1-byte request/response, median", "µs"),
    ("tcp_rr", "p99_us", "TCP 1-byte request/response, p99", "µs"),
    ("conn_rate", "per_second", "Connect, 1 request, close", "conn/s"),
    ("udp", "received_mbps", "UDP at {udp_rate}bit/s offered: received", "Mbit/s"),
    ("udp", "loss_pct", "UDP at {udp_rate}bit/s offered: loss", "%"),
    ("dns", "per_second", "DNS queries, local name", "queries/s"),
    ("tcp_up_1", "cpu_s_per_gb", "Stack CPU, TCP guest→host 1 stream", "CPU s/GB"),
    ("tcp_down_1", "cpu_s_per_gb", "Stack CPU, TCP host→guest 1 stream", "CPU s/GB"),
    ("tcp_up_4", "cpu_s_per_gb", "Stack CPU, TCP guest→host 4 streams", "CPU s/GB"),
    ("tcp_down_4", "cpu_s_per_gb", "Stack CPU, TCP host→guest 4 streams", "CPU s/GB"),
    ("port_forward", "cpu_s_per_gb", "Stack CPU, port forward host→guest", "CPU s/GB"),
    ("tcp6_up_1", "cpu_s_per_gb", "Stack CPU, TCP over IPv6 guest→host", "CPU s/GB"),
    ("tcp6_down_1", "cpu_s_per_gb", "Stack CPU, TCP over IPv6 host→guest", "CPU s/GB"),
    ("tcp_up_1", "relay_cpu_s_per_gb", "Relay CPU (QEMU, vnet_relay.py), TCP guest→host 1 stream",
     "CPU s/GB"),
    ("tcp_down_1", "relay_cpu_s_per_gb",
     "Relay CPU (QEMU, vnet_relay.py), TCP host→guest 1 stream", "CPU s/GB"),
    ("tcp_up_1", "total_cpu_s_per_gb", "Stack + relay CPU, TCP guest→host 1 stream", "CPU s/GB"),
    ("tcp_down_1", "total_cpu_s_per_gb", "Stack + relay CPU, TCP host→guest 1 stream", "CPU s/GB"),
]

SCALE_ROWS = [
    ("open_s", "{n} idle connections: time to open", "s"),
    ("echo_s", "{n} connections echo 1 KB each: time", "s"),
    ("ok", "{n} connections echo 1 KB each: succeeded", "conns"),
    ("rss_mib", "{n} connections held: stack RSS", "MiB"),
    ("fds", "{n} connections held: stack open fds", "fds"),
]

THROUGHPUT = [("tcp_up_1", "gbps", "guest→host\n1 stream"), ("tcp_down_1", "gbps", "host→guest\n1 stream"),
              ("tcp_up_4", "gbps", "guest→host\n4 streams"), ("tcp_down_4", "gbps", "host→guest\n4 streams"),
              ("port_forward", "gbps", "port forward\nhost→guest"),
              ("tcp6_up_1", "gbps", "IPv6 guest→host\n1 stream"),
              ("tcp6_down_1", "gbps", "IPv6 host→guest\n1 stream"),
              ("udp", "received_mbps", "UDP received\n(offered {udp_rate})")]


def fmt(value):
    if value is None:
        return "—"
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def rows(result):
    meta = result["meta"]
    out = [(w, m, label.format(udp_rate=meta["udp_rate"]), unit) for w, m, label, unit in ROWS]
    for n in meta["scale"]:
        out += [(f"scale_{n}", m, label.format(n=f"{n:,}"), unit) for m, label, unit in SCALE_ROWS]
    return out


def table_markdown(result):
    """The results table with its n/a reasons, as markdown."""
    meta = result["meta"]
    stacks = meta["stacks"]
    index = {(e["workload"], e["mtu"], e["stack"]): e for e in result["summary"]}
    notes = []

    def note(text):
        if text not in notes:
            notes.append(text)
        return notes.index(text) + 1

    head = ["Workload", "MTU", "Unit", *(stack_label(s) for s in stacks)]
    ratios = [(mine, base, title) for mine, base, title in RATIOS
              if mine in stacks and base in stacks]
    head += [title for _, _, title in ratios]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    spread = False
    for wid, metric, label, unit in rows(result):
        for mtu in meta["mtus"]:
            entries = [index.get((wid, mtu, s)) for s in stacks]
            if not any(e and (e["rounds_ok"] == 0 or e["metrics"].get(metric) is not None)
                       for e in entries):
                continue
            cells = []
            values = {}
            for stack, e in zip(stacks, entries):
                if e is None:
                    cells.append("")
                    continue
                value = e["metrics"].get(metric)
                if e["rounds_ok"] == 0:
                    cells.append(f"n/a [{note(e['errors'][0] if e['errors'] else 'no result')}]")
                    continue
                values[stack] = value
                cell = fmt(value)
                low, high = e.get("ranges", {}).get(metric, (None, None))
                if low and high / low > 2:
                    cell += " †"
                    spread = True
                if e["rounds_ok"] < e["rounds"]:
                    partial = (f"{stack}: only {e['rounds_ok']} of {e['rounds']} rounds "
                               f"succeeded: " + "; ".join(e["errors"]))
                    cell += f" [{note(partial)}]"
                cells.append(cell)
            row = [label, str(mtu), unit, *cells]
            for mine, base, _ in ratios:
                a, b = values.get(mine), values.get(base)
                row.append(f"{a / b:.2f}×" if a is not None and b else "—")
            lines.append("| " + " | ".join(row) + " |")
    if spread:
        lines += ["", "† the rounds differ by more than 2× (each round's figure is in "
                  "latest.json, under records)."]
    if notes:
        lines += ["", "n/a and partial results:", ""]
        lines += [f"{i}. {text}" for i, text in enumerate(notes, 1)]
    return "\n".join(lines)


def micro_markdown(micro):
    if isinstance(micro, str):
        return micro
    lines = ["| Function | median µs | ops/s |", "|---|---|---|"]
    for b in micro:
        lines.append(f"| {b['name']} | {b['median_us']:.2f} | {b['ops_per_s']:,.0f} |")
    return "\n".join(lines)


def header(result):
    meta = result["meta"]
    m = meta["machine"]
    by_version = {}                   # the QEMU stacks share one version: name it once
    for name, version in meta["versions"].items():
        if version:
            by_version.setdefault(version, []).append(name)
    versions = ", ".join(f"{'/'.join(names)} {v}" for v, names in by_version.items())
    mode = "smoke run" if meta["mode"] == "smoke" else "full run"
    return (f"{meta['date']}, {mode}: median of {meta['rounds']} round(s), "
            f"{meta['duration_s']:g} s per timed run, stacks alternating; "
            f"{m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, load {m.get('load', '?')}, "
            f"arcbox-net at {m['commit']}; "
            f"{versions}. Took {meta.get('elapsed_s', 0):.0f} s.")


NOTES = """\
- Guests are fresh network namespaces (one per stack, MTU and round). Servers (iperf3,
  bench/netprog.py) listen on the host's 127.0.0.1, reached from the guest at the stack's
  host alias: arcbox-net 10.0.2.1, slirp4netns, pasta and libslirp 10.0.2.2. The kernel row
  is a veth pair to a second namespace (10.200.0.1/30), with its servers there: the
  physical limit.
- Ratios are a stack / the one it is compared with, both from this run (arcbox-net variants
  against slirp4netns; the QEMU relay rows also against libslirp behind the same relay,
  idle and with the CPU competitor): above 1 is better for throughput and rates, below 1 is
  better for latency, time, CPU and memory.
- arcbox-net variants: "--queues 2" is the same TAP opened multi-queue and served by two
  processes (the guest's connections spread over them by the kernel's flow hash); "no
  offload" is the TAP with `--no-offload` (plain frames of at most the MTU); "via QEMU
  stream" is `--listen-stream` with QEMU (no guest booted) relaying the namespace's tap0
  to its `-netdev stream`, the path a VM's NIC takes, with QEMU's own copy in it; "via
  QEMU dgram" is the same with `--listen-dgram` and `-netdev dgram` (bulk workloads only);
  "--fd via QEMU dgram" is a socketpair, one end `--fd N`, the other QEMU's `-netdev
  dgram,local.type=fd` (bulk workloads only); "QEMU qlen 512" is the dgram relay with
  `net.unix.max_dgram_qlen=512` in QEMU's namespace (QEMU's socket is not connected to
  ours, so that qlen bounds our sends to it; default 10); "--fd --vnet-hdr" is `--fd N --vnet-hdr` on a
  socketpair whose other end is tests/programs/vnet_relay.py, relaying the namespace's tap0
  opened with IFF_VNET_HDR and offloads, virtio_net_hdr_v1 and all (TSO frames up to 64 KiB
  both ways); "no busy-poll" is `--busy-poll 0` and runs the latency workloads only.
- "libslirp via QEMU" is the same QEMU relay with QEMU's own `-netdev user` (libslirp) at
  the other end. QEMU runs in the host's namespace (its TAP is made there and then moved
  into the guest's), so libslirp's sockets see the host's loopback. The guest has routes
  to 10.0.2.2 only (libslirp has no egress policy). QEMU 7.2 sets no MTU for libslirp:
  it stays at 1500 and its MSS holds the guest to 1460 at MTU 65520 too. Its stack CPU is
  QEMU's, relay included.
- "via rootlesskit": Debian's rootlesskit (`--net=slirp4netns --port-driver=slirp4netns`,
  its `--mtu`) run rootless by an unprivileged user, a `sleep` as its child, whose network
  namespace is the guest; `--slirp4netns-binary` is arcbox-net-slirp4netns (with `--deny
  0.0.0.0/0 --allow 127.0.0.0/8` in ARCBOX_NET_SLIRP4NETNS_OPTS) or slirp4netns. It runs
  in a fresh namespace with only lo, the servers on its 127.0.0.1, reached at 10.0.2.2
  (rootlesskit 1.1 allows the host's loopback unless `--disable-host-loopback`).
- "+ CPU hog": the same stack with one busy loop per CPU but one (here: one) running during
  each workload, unpinned, as a VM's busy vCPU beside the stack would be. One-stream bulk
  workloads only.
- Relay CPU is that of QEMU (or vnet_relay.py) per GB; "stack + relay" adds the stack's
  (for libslirp they are the one QEMU process, counted once).
- Stack CPU is the user+system time per GB received of the stack's process and its child
  processes (from /proc/PID/stat; RSS and fds count them too); the kernel row has no
  process to measure. The port forward of pasta splices loopback sockets (no frames
  through its tap); the kernel row's "forward" is the direct route.
- IPv6 rows: one iperf3 stream each way to a server on the host side's ::1, reached at
  the stack's alias of it: arcbox-net fd00::1 (the guest at fd00::2, default route via
  fe80::1; `--deny ::/0 --allow ::1/128`), slirp4netns `--enable-ipv6` fd00::2 (the guest
  configured by its RA), the kernel veth fd10::1. pasta copies the host's addresses and
  routes, and this host's IPv6 is a real network, so its IPv6 rows ("pasta-v6") run in a
  host namespace of its own (lo, and a veth into an empty namespace holding fd10::1/64 and
  the default routes: nothing pasta sends elsewhere than its loopback goes anywhere), the
  guest reaching ::1 at the gateway fd10::ff. rootlesskit and libslirp via QEMU have no
  IPv6 row (run without IPv6, as Docker and this relay run them).
- DNS: only arcbox-net has a local name (host.arcbox.internal); the others would forward to
  the host's resolver, and this benchmark sends nothing off the machine.
- Scale rows run at the first MTU only; in the echo phase each connection gets 30 s, so
  30 s there is that cap (the ones slower than that count as not succeeded).
- pasta runs with `--runas 0` (as root it would otherwise switch to nobody and fail to
  join the namespace) and `-q` (this version crashes in its debug logging).
- The machine is shared: "load" in the header is the 1-minute load average before and
  after the run; other work on it adds noise, which the median of rounds only damps."""


def write(out_dir, result):
    meta = result["meta"]
    parts = ["# arcbox-net benchmarks", "", header(result), "", table_markdown(result), "",
             "Notes:", "", NOTES, ""]
    if "micro" in meta:
        parts += ["## Micro-benchmarks (bench/micro, pytest-benchmark)", "",
                  micro_markdown(meta["micro"]), ""]
    parts += ["Plots: [throughput.png](throughput.png), [latency.png](latency.png).", ""]
    with open(os.path.join(out_dir, "latest.md"), "w") as f:
        f.write("\n".join(parts))
    plot(out_dir, result)


def plot(out_dir, result):
    import matplotlib
    matplotlib.use("Agg")

    meta = result["meta"]
    stacks = meta["stacks"]
    index = {(e["workload"], e["mtu"], e["stack"]): e for e in result["summary"]}
    mtus = meta["mtus"]

    # Throughput per workload per stack (Gbit/s, log scale), one panel per MTU;
    # only stacks that ran a throughput workload (variants may run latency only).
    stacks = [s for s in stacks if any((wid, mtu, s) in index
                                       for wid, _, _ in THROUGHPUT for mtu in mtus)]
    if stacks:
        _plot_throughput(out_dir, meta, index, stacks, mtus)
    _plot_latency(out_dir, meta, index, meta["stacks"], mtus)


def _plot_throughput(out_dir, meta, index, stacks, mtus):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(mtus), 1, figsize=(11, 4.2 * len(mtus)), squeeze=False)
    width = 0.8 / len(stacks)
    for ax, mtu in zip(axes[:, 0], mtus):
        labels = [label.format(udp_rate=meta["udp_rate"]) for _, _, label in THROUGHPUT]
        for i, stack in enumerate(stacks):
            heights = []
            for wid, metric, _ in THROUGHPUT:
                e = index.get((wid, mtu, stack))
                value = e["metrics"].get(metric) if e and e["rounds_ok"] else None
                if value is not None and metric == "received_mbps":
                    value /= 1000
                heights.append(value or 0)
            xs = [x + (i - (len(stacks) - 1) / 2) * width for x in range(len(THROUGHPUT))]
            bars = ax.bar(xs, heights, width, label=stack_label(stack))
            for bar, h in zip(bars, heights):
                ax.annotate(fmt(h) if h else "n/a", (bar.get_x() + bar.get_width() / 2, h or 0.01),
                            ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_yscale("log")
        ax.set_ylim(0.01, max([1.0, *ax.get_ylim()[1:]]) * 8)   # room for the labels
        ax.set_xticks(range(len(THROUGHPUT)), labels, fontsize=8)
        ax.set_ylabel("Gbit/s (log)")
        ax.set_title(f"Throughput, MTU {mtu} (median of {meta['rounds']} rounds)")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "throughput.png"), dpi=90)
    plt.close(fig)



def _plot_latency(out_dir, meta, index, stacks, mtus):
    """Latency: distribution (CDF) of 1-byte round trips, one panel per MTU."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(mtus), figsize=(6 * len(mtus), 4.2), squeeze=False)
    for ax, mtu in zip(axes[0], mtus):
        for stack in stacks:
            e = index.get(("tcp_rr", mtu, stack))
            pct = e["metrics"].get("percentiles_us") if e and e["rounds_ok"] else None
            if pct:
                ax.plot(pct, range(101), label=stack_label(stack))
        ax.set_xscale("log")
        ax.set_xlabel("round trip, µs (log)")
        ax.set_ylabel("percentile")
        ax.set_title(f"TCP 1-byte request/response, MTU {mtu}")
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "latency.png"), dpi=90)
    plt.close(fig)
