"""A VMM stand-in that speaks virtio-net: a TAP with IFF_VNET_HDR on one side,
an inherited datagram socket on the other, each frame passed with its
12-byte virtio_net_hdr_v1 unchanged, as a VMM hands its guest's frames over.

    vnet_relay.py TAPNAME FD     (run inside the guest's namespace)

The TAP is created here with TSO/checksum offload on, so the namespace's
kernel (the guest) sends 64 KiB TSO frames with partial checksums and takes
them from the stack. Prints "ready" once relaying; exits when the socket's
peer goes away. Written independently of arcbox_net.
"""

import fcntl
import os
import socket
import struct
import sys
import threading

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
READ = 70000


def main(name, fd):
    tap = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(tap, TUNSETIFF, struct.pack("16sH22x", name.encode(),
                                            IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    fcntl.ioctl(tap, TUNSETVNETHDRSZ, struct.pack("i", 12))
    fcntl.ioctl(tap, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
    sock = socket.socket(fileno=fd)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
    done = threading.Event()

    def tap_to_socket():
        try:
            while True:
                sock.send(os.read(tap, READ))
        except OSError:
            done.set()

    def socket_to_tap():
        try:
            while True:
                data = sock.recv(READ)
                if data:
                    os.write(tap, data)
        except OSError:
            done.set()

    for target in (tap_to_socket, socket_to_tap):
        threading.Thread(target=target, daemon=True).start()
    print("ready", flush=True)
    done.wait()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
