"""The contracts between the stack's parts, in one place.

Links move Ethernet frames; the dispatcher classifies them and hands each to
the handler registered for its EtherType, IP protocol or UDP port. Handlers
answer through the framer (``framer.Framer``), which turns their packets into
frames from what the link declares in ``LinkCapabilities``.
"""

import attrs
from zope.interface import Attribute, Interface


@attrs.frozen
class LinkCapabilities:
    """What a link carries, declared by the link and read by the framer.

    ``max_frame``: the largest plain Ethernet frame (header included, any
    virtio-net header not), i.e. 14 + the MTU. ``vnet_header_len``: 0 when
    frames travel bare, else the length of the ``struct virtio_net_hdr``
    before each one (10, or 12 for virtio 1.x with num_buffers); the link then
    takes offload metadata with each frame. ``csum_offload``: the peer accepts
    partial checksums (NEEDS_CSUM). ``gso_tcpv4`` / ``gso_tcpv6``: the peer
    accepts TCP GSO frames of that family up to 64 KiB and cuts them itself.
    """

    max_frame: int = 1514
    vnet_header_len: int = 0
    csum_offload: bool = False
    gso_tcpv4: bool = False
    gso_tcpv6: bool = False

    @classmethod
    def plain(cls, mtu):
        """A link of bare frames of at most ``mtu`` bytes of IP."""
        return cls(max_frame=14 + mtu)


class IFrameSink(Interface):
    """Receives what a link reads from the guest."""

    def frames_received(frames):
        """A batch of frames read in one wakeup (a list of bytes)."""

    def link_lost(reason):
        """The link failed for good; no more frames will come.

        Only the link as a whole: a link that serves successive peers (a
        listening socket, ``--listen-stream``/``--listen-dgram``) does not
        report one peer leaving; it logs that and waits for the next peer.
        """


class ILink(Interface):
    """A guest network card: a transport of whole Ethernet frames."""

    description = Attribute("Human-readable description, e.g. 'tap tap0 in netns x'.")
    mtu = Attribute("The largest IP packet the link carries.")
    capabilities = Attribute("A LinkCapabilities: frame size, virtio-net header, offloads.")

    def start(sink):
        """Begin reading; deliver batches of frames to ``sink`` (an IFrameSink)."""

    def send_frame(frame, vnet_header=None):
        """Queue one frame (bytes, or a sequence of buffers to gather).

        ``vnet_header``: on a link whose capabilities declare a virtio-net
        header, that header (offload metadata: partial checksum, GSO) as
        bytes; None means a complete frame (the link sends an all-zero
        header). Links without one take no second argument from the framer.
        EAGAIN never drops: the frame waits in the write queue; only a frame
        the kernel keeps refusing is dropped and counted.
        """

    def stop():
        """Stop reading and writing and close the link's fd."""


class IEthernetHandler(Interface):
    """Handles one EtherType other than IPv4 (e.g. ARP)."""

    ethertype = Attribute("The EtherType handled, e.g. 0x0806.")

    def handle_frame(frame):
        """Handle a whole Ethernet frame."""


class IIPv4Handler(Interface):
    """Handles one IP protocol of IPv4 packets addressed through the gateway."""

    ip_protocol = Attribute("The IP protocol number handled, e.g. 6 for TCP.")

    def handle_ipv4(frame, ip):
        """Handle ``frame``, whose IPv4 header was parsed into ``ip``."""


class IIPv6Handler(Interface):
    """Handles one upper-layer protocol of IPv6 packets addressed through the
    gateway; ``ip`` is an ``ipv6.Ipv6Header`` (extension headers walked),
    whose fields are named as ``Ipv4Header``'s so one handler can serve both."""

    ip_protocol = Attribute("The upper-layer protocol number handled, e.g. 6 for TCP.")

    def handle_ipv6(frame, ip):
        """Handle ``frame``, whose IPv6 header chain was parsed into ``ip``."""


class IUDPService(Interface):
    """A UDP service the stack itself offers (DHCP, DNS on the gateway)."""

    udp_port = Attribute("The destination port served.")
    local_only = Attribute(
        "True if only datagrams to a stack-owned address (or broadcast) are "
        "for this service; others fall through to UDP NAT.")

    def handle_datagram(frame, ip, src_port, payload):
        """Handle one datagram; ``payload`` is the UDP payload. ``ip`` is the
        datagram's IPv4 header, or its IPv6 one for a service that also
        provides ``IUDP6Service``."""


class IUDP6Service(Interface):
    """Marks an IUDPService that also serves IPv6 (DHCPv6, DNS): the
    dispatcher hands it datagrams of both families on ``udp_port``, or of
    IPv6 only when it provides only this interface."""

    udp_port = Attribute("The destination port served.")
    local_only = Attribute("As IUDPService's.")

    def handle_datagram(frame, ip, src_port, payload):
        """As IUDPService's, with an ``ipv6.Ipv6Header`` as ``ip``."""


class IFlushable(Interface):
    """A handler that wants a call after each batch of frames (to batch ACKs)."""

    def flush():
        """The current batch of frames has been dispatched."""
