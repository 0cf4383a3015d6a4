"""Guest links: transports that carry the guest's Ethernet frames.

Every link provides ILink. ``base.FrameLink`` holds what they share: a read
loop with a per-wakeup budget and a write queue that never drops a frame.
"""


def open_link(config, fd=None, tap=None, netns=None, tap_name="tap0", configure=False,
              reactor=None):
    """Open the one link the options name; raise ValueError/TapError with a message."""
    from .socket import SocketFrameLink
    from .tap import TapLink

    chosen = [name for name, value in (("--fd", fd), ("--tap", tap), ("--netns", netns))
              if value is not None]
    if len(chosen) != 1:
        raise ValueError("give exactly one of --fd, --tap, --netns"
                         + (f" (got {', '.join(chosen)})" if chosen else ""))
    if fd is not None:
        return SocketFrameLink.from_fd(fd, mtu=config.mtu, reactor=reactor)
    if tap is not None:
        return TapLink.open(tap, mtu=config.mtu, reactor=reactor)
    settings = None
    if configure:
        settings = dict(address=str(config.guest), prefixlen=config.subnet.prefixlen,
                        mtu=config.mtu, gateway=str(config.gateway))
    return TapLink.open_in_netns(netns, tap_name, mtu=config.mtu, configure=settings,
                                 reactor=reactor)
