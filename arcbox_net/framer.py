"""The one way out to the guest: IP packets in, frames for the link out.

Theory of operation
-------------------
Protocol code never builds a frame and never looks at the link. It describes
an IP packet -- source, destination, IP protocol, the L4 header with its
checksum field zero (TCP and UDP; the framer fills it in) or a finished L4
message (ICMP), the payload, and for TCP the segment size the guest accepts
-- and hands it to the ``Framer``. From the link's declared ``capabilities``
(``interfaces.LinkCapabilities``) the framer decides what goes on the wire:

- Checksums: on a link with checksum offload a TCP segment carries only the
  pseudo-header sum and a virtio-net header marked NEEDS_CSUM (the guest's
  kernel finishes the sum); everything else carries its full checksum.
- Size: a TCP segment longer than its segment size leaves, on a link with
  TCPv4 GSO, as one GSO frame (``gso_size`` = the segment size, ``hdr_len`` =
  the headers each segment repeats); TCP asks ``tcp_segment_limit`` how much
  one emitted segment may carry, so it never exceeds what the link takes.
  A UDP or ICMP packet larger than the link's MTU leaves as IPv4 fragments,
  as a router would send it.
- Ethernet: each packet goes to the MAC that owns its destination address
  (``neighbours.NeighbourTable``, one dict lookup), as a router sends it.
  A packet for an address with no entry waits in a bounded queue of that
  address (with full checksums and no virtio-net metadata, so it stays valid
  on any link) and the gateway asks for the address with ARP at most once a
  second; the queues are bounded per address and in total.

The address family is a row of ``_FAMILIES`` (chosen by address length): a
header builder, a pseudo-header sum, a fragmenter, an EtherType and a GSO
type. IPv6 is the second row, not a second framer; what differs beyond the
row is small and here: ICMP errors are translated to ICMPv6 ones
(``_ICMP6_ERRORS``), multicast destinations map to 33:33 MACs, and an
unresolved IPv6 neighbour is asked for by neighbour solicitation, not ARP. Every frame, whatever its source,
passes ``send_frame``: one place counts frames out and feeds the capture.
"""

import time
from collections import Counter, deque

from .interfaces import LinkCapabilities
from .neighbours import NeighbourTable
from .wire import ethernet, icmp, icmpv6, ipv4, ipv6, tcp, udp, vnet
from .wire.checksum import fold, ones_sum, pseudo_header_sum

#: Largest TCP payload of one GSO frame: the IPv4 total length is 16 bits.
GSO_TCP_SEGMENT = 65535 - ipv4.HEADER_LEN - tcp.HEADER_LEN
#: Where the L4 checksum field sits in the header of each protocol whose sum
#: covers a pseudo-header (ICMPv4's does not: its messages come finished).
_CSUM_FIELD = {ipv4.PROTO_TCP: 16, ipv4.PROTO_UDP: 6}
_FRAGMENTED = {ipv4.PROTO_UDP: "udp-fragmented", ipv4.PROTO_ICMP: "icmp-fragmented"}
_L3_START = ethernet.HEADER_LEN
_ARP_REQUEST_BODY = bytes.fromhex("0001080006040001")


class _IPv4:
    """What the framer needs of an address family: its header, its pseudo-
    header sum, how it fragments, its EtherType and its TCP GSO type. IPv6 is
    one more such table (chosen by address length), not a second framer."""

    ethertype = ethernet.ETHERTYPE_IPV4
    header_len = ipv4.HEADER_LEN
    gso_tcp = vnet.GSO_TCPV4
    build_header = staticmethod(ipv4.build_header)
    pseudo_header_sum = staticmethod(pseudo_header_sum)
    fragment = staticmethod(ipv4.fragment)


class _IPv6:
    ethertype = ethernet.ETHERTYPE_IPV6
    header_len = ipv6.HEADER_LEN
    gso_tcp = vnet.GSO_TCPV6
    build_header = staticmethod(ipv6.build_header)
    pseudo_header_sum = staticmethod(ipv6.pseudo_header_sum)
    fragment = staticmethod(ipv6.fragment)


#: Families by address length.
_FAMILIES = {4: _IPv4, 16: _IPv6}

#: ICMPv4 (type, code) -> the ICMPv6 error a router sends for the same
#: failure (RFC 4443 3): protocols speak ICMPv4, the framer translates.
_ICMP6_ERRORS = {
    (icmp.TYPE_DEST_UNREACH, icmp.CODE_NET_UNREACH): (icmpv6.TYPE_DEST_UNREACH,
                                                      icmpv6.CODE_NO_ROUTE),
    (icmp.TYPE_DEST_UNREACH, icmp.CODE_HOST_UNREACH): (icmpv6.TYPE_DEST_UNREACH,
                                                       icmpv6.CODE_ADDR_UNREACH),
    (icmp.TYPE_DEST_UNREACH, icmp.CODE_PORT_UNREACH): (icmpv6.TYPE_DEST_UNREACH,
                                                       icmpv6.CODE_PORT_UNREACH),
    (icmp.TYPE_DEST_UNREACH, icmp.CODE_ADMIN_PROHIBITED): (icmpv6.TYPE_DEST_UNREACH,
                                                           icmpv6.CODE_ADMIN_PROHIBITED),
    (icmp.TYPE_DEST_UNREACH, icmp.CODE_FRAG_NEEDED): (icmpv6.TYPE_PACKET_TOO_BIG, 0),
    (icmp.TYPE_TIME_EXCEEDED, 0): (icmpv6.TYPE_TIME_EXCEEDED, icmpv6.CODE_HOP_LIMIT),
    (icmp.TYPE_TIME_EXCEEDED, 1): (icmpv6.TYPE_TIME_EXCEEDED, icmpv6.CODE_REASSEMBLY),
}
#: Any other unreachable: the address is.
_ICMP6_UNREACHABLE = (icmpv6.TYPE_DEST_UNREACH, icmpv6.CODE_ADDR_UNREACH)


def _gather(payload):
    """(list of buffers, total length) of a payload given as one or many buffers."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return ([payload] if len(payload) else []), len(payload)
    parts = [p for p in payload if len(p)]
    return parts, sum(len(p) for p in parts)


class Framer:
    """Turns IP packet descriptions into frames for one link."""

    #: Packets held while their destination's MAC is unknown: in total, per
    #: address, and addresses waiting at once.
    unresolved_limit = 256
    unresolved_per_address = 64
    unresolved_addresses = 64
    #: Seconds a packet may wait for an address nobody answers ARP for.
    unresolved_timeout = 3.0

    def __init__(self, config, link=None, clock=time.monotonic):
        self.gateway_mac = config.gateway_mac
        self._gateway_ip = config.gateway.packed
        self._gateway6 = config.gateway6.packed
        self._default_mtu = config.mtu
        self._broadcasts = {b"\xff\xff\xff\xff", config.subnet.broadcast_address.packed}
        self.clock = clock
        #: Who owns which guest address; ``_macs`` is its lookup table.
        self.neighbours = NeighbourTable(config)
        self._macs = self.neighbours.macs
        self.frames_out = 0
        self.drops = Counter()
        self.counters = Counter()
        #: A packet capture seeing every frame sent, or None.
        self.capture = None
        self._ident = 0
        self._unresolved = {}        # address -> deque of (ethertype, packet buffers)
        self._unresolved_count = 0
        self._last_arp_request = {}  # address -> [first, last] clock() of ARP requests for it
        self.attach(link)

    def attach(self, link):
        """Frame for ``link`` from now on, by what it declares it carries."""
        self.link = link
        caps = getattr(link, "capabilities", None)
        if caps is None:
            caps = LinkCapabilities(max_frame=ethernet.HEADER_LEN + self._default_mtu)
        self.capabilities = caps
        self.mtu = caps.max_frame - ethernet.HEADER_LEN
        self._vnet_len = caps.vnet_header_len
        self._csum_offload = caps.csum_offload and self._vnet_len > 0
        self._gso_tcpv4 = caps.gso_tcpv4 and self._csum_offload
        self._gso_tcpv6 = caps.gso_tcpv6 and self._csum_offload
        #: TCP payload one emitted segment may carry: None for one MSS (per family).
        self.tcp_segment_limit = GSO_TCP_SEGMENT if self._gso_tcpv4 else None
        self.tcp_segment_limit6 = GSO_TCP_SEGMENT if self._gso_tcpv6 else None

    # -- frames

    def send_frame(self, frame, vnet_header=None):
        """Send one whole frame (bytes, or a list of buffers to gather)."""
        if self.link is None:
            self.drops["no-link"] += 1
            return
        self.frames_out += 1
        if self.capture is not None:
            self.capture.write(frame)
        if vnet_header is None:
            self.link.send_frame(frame)
        else:
            self.link.send_frame(frame, vnet_header)

    def ethernet_header(self, dst_mac, ethertype=ethernet.ETHERTYPE_IPV4):
        return ethernet.header(dst_mac, self.gateway_mac, ethertype)

    @property
    def guest_mac(self):
        """The MAC learned last (the guest's, on a link with one guest)."""
        return self.neighbours.last_mac

    def mac_for(self, dst):
        """The MAC a packet to ``dst`` (address bytes) goes to, or None."""
        mac = self._macs.get(dst)
        if mac is None:
            if dst in self._broadcasts:
                return ethernet.BROADCAST
            if len(dst) == 16 and dst[0] == 0xFF:
                return ipv6.multicast_mac(dst)
        return mac

    def send_ethernet(self, dst_mac, ethertype, body):
        """A frame of another EtherType (ARP) from the gateway to ``dst_mac``."""
        self.send_frame(ethernet.header(dst_mac, self.gateway_mac, ethertype) + body)

    def seed_ident(self, value):
        """Start IP identifiers at ``value`` (processes sharing a link differ)."""
        self._ident = value & 0xFFFF

    def next_ident(self):
        self._ident = (self._ident + 1) & 0xFFFF
        return self._ident

    # -- IP packets

    def send_ip(self, src, dst, protocol, l4, payload=b"", ttl=64, dst_mac=None):
        """Send an IP packet: ``l4`` is the L4 header (checksum field zero for
        TCP and UDP, filled in here) or a whole ICMP message; ``payload`` one
        buffer or a list of them. Larger than the MTU: fragmented."""
        family = _FAMILIES[len(src)]
        parts, size = _gather(payload)
        length = len(l4) + size
        field = _CSUM_FIELD.get(protocol)
        if field is not None:
            total = ones_sum(l4, family.pseudo_header_sum(src, dst, protocol, length))
            for part in parts:
                total = fold(total + ones_sum(part))
            csum = ~total & 0xFFFF
            if protocol == ipv4.PROTO_UDP and csum == 0:
                csum = 0xFFFF
            l4 = bytes(l4[:field]) + csum.to_bytes(2, "big") + bytes(l4[field + 2:])
        if family.header_len + length > self.mtu and protocol != ipv4.PROTO_TCP:
            self._send_fragments(family, src, dst, protocol, b"".join([l4, *parts]), ttl,
                                 dst_mac)
            return
        ip_header = family.build_header(src, dst, protocol, length, ttl=ttl,
                                        ident=self.next_ident())
        if dst_mac is None:
            dst_mac = self.mac_for(dst)
            if dst_mac is None:
                self._hold(dst, family, ip_header, l4, parts)
                return
        head = self.ethernet_header(dst_mac, family.ethertype) + ip_header + l4
        if not parts:
            self.send_frame(head)
        elif size < 2048 and len(parts) == 1:
            self.send_frame(head + parts[0])
        else:
            self.send_frame([head, *parts])

    def _send_fragments(self, family, src, dst, protocol, datagram, ttl, dst_mac):
        self.counters[_FRAGMENTED.get(protocol, "ip-fragmented")] += 1
        fragments = family.fragment(src, dst, protocol, datagram, self.mtu, self.next_ident(),
                                    ttl)
        if dst_mac is None:
            dst_mac = self.mac_for(dst)
        for header, chunk in fragments:
            if dst_mac is None:
                self._hold(dst, family, header, chunk, [])
            else:
                self.send_frame([self.ethernet_header(dst_mac, family.ethertype), header, chunk])

    def send_udp(self, src, dst, sport, dport, payload, dst_mac=None):
        self.send_ip(src, dst, ipv4.PROTO_UDP, udp.header(sport, dport, len(payload)), payload,
                     dst_mac=dst_mac)

    def send_icmp_error(self, src, dst, icmp_type, code, quote, mtu=0):
        """An ICMP error from ``src`` quoting the guest's packet (``quote``);
        to an IPv6 guest, the ICMPv6 error for the same failure."""
        if len(src) == 16:
            kind = _ICMP6_ERRORS.get((icmp_type, code))
            if kind is None:
                if icmp_type != icmp.TYPE_DEST_UNREACH:
                    self.drops["icmpv6-untranslatable-error"] += 1
                    return
                kind = _ICMP6_UNREACHABLE
            self.send_ip(src, dst, ipv6.NH_ICMPV6,
                         icmpv6.error(src, dst, kind[0], kind[1], quote, mtu))
            return
        self.send_ip(src, dst, ipv4.PROTO_ICMP, icmp.error(icmp_type, code, quote, mtu))

    def send_tcp(self, src, dst, sport, dport, seq, ack, flags, window, payload=b"",
                 options=b"", segment_size=0):
        """One TCP segment; ``segment_size`` > 0 lets a longer payload leave as
        one GSO frame that the guest's kernel cuts into segments of that size.

        The per-segment path: one struct pack for an IPv4 segment (its options,
        timestamps and SACK blocks, included), no copy of the payload (it is
        gathered into the write).
        """
        family = _FAMILIES[len(src)]
        guest_mac = self._macs.get(dst)
        if guest_mac is None or not self._csum_offload and family is not _IPv4:
            head = tcp.header(sport, dport, seq, ack, flags, window, options)
            self.send_ip(src, dst, ipv4.PROTO_TCP, head, payload)
            return
        size = len(payload)
        if not self._csum_offload:
            head = tcp.frame_header(self.ethernet_header(guest_mac), src, dst, self.next_ident(),
                                    sport, dport, seq, ack, flags, window, payload,
                                    options=options)
            self.send_frame([head, payload] if size else head)
            return
        head = tcp.build_header_partial(src, dst, sport, dport, seq, ack, flags, window, size,
                                        options)
        hlen = len(head)
        csum_start = _L3_START + family.header_len
        if size > segment_size > 0 and (self._gso_tcpv4 if family is _IPv4
                                        else self._gso_tcpv6):
            meta = vnet.build(self._vnet_len, vnet.F_NEEDS_CSUM, family.gso_tcp,
                              csum_start + hlen, segment_size, csum_start, 16)
        else:
            meta = vnet.build(self._vnet_len, vnet.F_NEEDS_CSUM, vnet.GSO_NONE,
                              csum_start + hlen, 0, csum_start, 16)
        head = self.ethernet_header(guest_mac, family.ethertype) + family.build_header(
            src, dst, ipv4.PROTO_TCP, hlen + size, ident=self.next_ident()) + head
        self.send_frame([head, payload] if size else head, meta)

    # -- neighbours

    def _hold(self, dst, family, ip_header, l4, parts):
        """Queue a packet until ``dst``'s MAC is known and ask for it by ARP
        (at most once a second per address). Only guest addresses inside the
        subnet are asked for; the queues are bounded (per address, addresses,
        total) and what does not fit is dropped and counted."""
        dst = bytes(dst)
        if not self.neighbours.in_subnet(dst):
            self.drops["no-neighbour-off-subnet"] += 1
            return
        now = self.clock()
        asked = self._last_arp_request.get(dst)
        queue = self._unresolved.get(dst)
        if queue and asked is not None and now - asked[0] >= self.unresolved_timeout:
            # Nobody answered for that long: what waited is stale, start over.
            self.drops["unresolved-timeout"] += len(queue)
            self._unresolved_count -= len(queue)
            queue.clear()
            asked = None
        if queue is None:
            if len(self._unresolved) >= self.unresolved_addresses:
                self._purge(now)
            if len(self._unresolved) >= self.unresolved_addresses:
                self.drops["unresolved-addresses-full"] += 1
                return
            queue = self._unresolved[dst] = deque()
        if len(queue) >= self.unresolved_per_address or \
                self._unresolved_count >= self.unresolved_limit:
            self.drops["unresolved-queue-full"] += 1
            if not queue:
                del self._unresolved[dst]
            return
        queue.append((family.ethertype, [ip_header, bytes(l4), *(bytes(p) for p in parts)]))
        self._unresolved_count += 1
        if asked is None or now - asked[1] >= 1.0:
            if asked is None:
                if len(self._last_arp_request) >= 4 * self.unresolved_addresses:
                    self._last_arp_request.clear()
                asked = self._last_arp_request[dst] = [now, now]
            asked[1] = now
            if family is _IPv6:
                self._solicit(dst)
            else:
                self.counters["arp-requests-sent"] += 1
                self.send_ethernet(ethernet.BROADCAST, ethernet.ETHERTYPE_ARP,
                                   _ARP_REQUEST_BODY + self.gateway_mac + self._gateway_ip
                                   + bytes(6) + dst)

    def _solicit(self, target):
        """Ask for an IPv6 guest address's MAC: a neighbour solicitation to
        its solicited-node group, from the gateway address of its scope."""
        self.counters["ndp-solicitations-sent"] += 1
        src = ipv6.ROUTER_LINK_LOCAL.packed if ipv6.is_link_local(target) else self._gateway6
        group = ipv6.solicited_node(target)
        message = icmpv6.neighbor_solicitation(src, group, target, self.gateway_mac)
        self.send_ip(src, group, ipv6.NH_ICMPV6, message, ttl=255,
                     dst_mac=ipv6.multicast_mac(group))

    def _purge(self, now):
        """Drop the queues of addresses nobody answered for ``unresolved_timeout``."""
        for address, asked in list(self._last_arp_request.items()):
            if now - asked[0] >= self.unresolved_timeout:
                del self._last_arp_request[address]
                queue = self._unresolved.pop(address, None)
                if queue:
                    self.drops["unresolved-timeout"] += len(queue)
                    self._unresolved_count -= len(queue)

    def learn(self, address, mac, now=None):
        """``mac`` owns ``address`` (validated by the caller): record it and
        send what waited for it."""
        if now is None:
            now = self.clock()
        if self.neighbours.confirm(address, mac, now):
            self.release(address)

    def learn_claim(self, address, mac):
        """A guest says ``mac`` has ``address`` (an ARP sender, an NDP link-layer
        option): learned if the neighbour table lets that MAC use it; True then."""
        now = self.clock()
        if not self.neighbours.valid_source(address, mac, now):
            return False
        self.learn(address, mac, now)
        return True

    def release(self, address):
        """Send the packets that waited for ``address``'s MAC, if it is known."""
        address = bytes(address)
        mac = self._macs.get(address)
        if mac is None:
            return
        self._last_arp_request.pop(address, None)
        queue = self._unresolved.pop(address, None)
        if not queue:
            return
        self._unresolved_count -= len(queue)
        while queue:
            ethertype, packet = queue.popleft()
            self.send_frame([self.ethernet_header(mac, ethertype), *packet])

    def unresolved(self):
        """Packets waiting for a neighbour, by address (for stats)."""
        return {a: len(q) for a, q in self._unresolved.items()}
