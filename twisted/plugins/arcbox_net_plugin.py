"""twistd plugin: ``twistd -n arcbox-net --netns NAME``.

Kept tiny: twistd imports every plugin module to list them, so nothing here
may import the reactor or the stack.
"""

from twisted.application.service import ServiceMaker

arcbox_net = ServiceMaker(
    "arcbox-net",
    "arcbox_net.cli",
    "User-mode network stack for VMs and containers: DHCP, DNS, NAT, port forwarding.",
    "arcbox-net",
)
