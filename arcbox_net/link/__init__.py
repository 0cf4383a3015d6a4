"""Guest links: transports that carry the guest's Ethernet frames.

Every link provides ILink and keeps ``base.LinkState`` (counters, sink, reactor).
``base.FrameLink`` adds what the frame-per-read links share: a read loop with a
per-wakeup budget and a write queue that drops (and counts) only what the
kernel keeps refusing.
``stream`` and ``dgram`` hold the unix-socket links QEMU, passt and vfkit use;
``vhost_user`` (over ``virtqueue``) is QEMU's vhost-user net back-end.
"""

import socket as _socket

#: The options that choose a link; exactly one must be given.
LINK_OPTIONS = ("--fd, --tap, --netns, --listen-stream, --connect-stream, --listen-dgram, "
                "--vhost-user")


def open_link(config, fd=None, tap=None, netns=None, tap_name="tap0", configure=False,
              reactor=None, listen_stream=None, connect_stream=None, listen_dgram=None,
              offload=True, queues=1, vnet_hdr=False, vhost_user=None):
    """Open the one link the options name; raise ValueError/TapError with a message."""
    from .dgram import DgramListenLink
    from .socket import SocketFrameLink, VnetSocketFrameLink
    from .stream import StreamLink, StreamListenLink
    from .tap import TapLink

    chosen = [name for name, value in (("--fd", fd), ("--tap", tap), ("--netns", netns),
                                       ("--listen-stream", listen_stream),
                                       ("--connect-stream", connect_stream),
                                       ("--listen-dgram", listen_dgram),
                                       ("--vhost-user", vhost_user))
              if value is not None]
    if len(chosen) != 1:
        raise ValueError("give exactly one of " + LINK_OPTIONS
                         + (f" (got {', '.join(chosen)})" if chosen else ""))
    if queues != 1 and tap is None and netns is None:
        raise ValueError("--queues needs a TAP link (--tap or --netns)")
    if vnet_hdr and fd is None:
        raise ValueError("--vnet-hdr goes with --fd")
    if fd is not None:
        sock = SocketFrameLink.socket_from_fd(fd)
        if sock.type == _socket.SOCK_STREAM:  # 4-byte length framing
            if vnet_hdr:
                sock.detach()  # the fd stays the caller's
                raise ValueError(f"--vnet-hdr needs a datagram or seqpacket socket; fd {fd} "
                                 "is a stream socket")
            return StreamLink.from_socket(sock, mtu=config.mtu, reactor=reactor)
        if vnet_hdr:
            return VnetSocketFrameLink(sock, mtu=config.mtu, reactor=reactor)
        return SocketFrameLink(sock, mtu=config.mtu, reactor=reactor)
    if listen_stream is not None:
        return StreamListenLink.listen(listen_stream, mtu=config.mtu, reactor=reactor)
    if connect_stream is not None:
        return StreamLink.connect(connect_stream, mtu=config.mtu, reactor=reactor)
    if listen_dgram is not None:
        return DgramListenLink.listen(listen_dgram, mtu=config.mtu, reactor=reactor)
    if vhost_user is not None:
        from .vhost_user import VhostUserLink
        return VhostUserLink.listen(vhost_user, mtu=config.mtu, reactor=reactor)
    if tap is not None:
        return TapLink.open(tap, mtu=config.mtu, reactor=reactor, offload=offload,
                            queues=queues)
    settings = None
    if configure:
        settings = dict(address=str(config.guest), prefixlen=config.subnet.prefixlen,
                        mtu=config.mtu, gateway=str(config.gateway))
    return TapLink.open_in_netns(netns, tap_name, mtu=config.mtu, configure=settings,
                                 offload=offload, queues=queues,
                                 reactor=reactor)
