"""Send raw Ethernet frames out of an interface (run inside the guest namespace).

  rawsend.py IFACE COUNT INTERVAL HEXFRAME...

sends the frames COUNT times (0: until killed), INTERVAL seconds apart:
what a second MAC on the link, or a guest forging its source, puts on the wire.
"""

import socket
import sys
import time


def main():
    iface, count, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    frames = [bytes.fromhex(h) for h in sys.argv[4:]]
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    n = 0
    while count == 0 or n < count:
        for frame in frames:
            s.send(frame)
        n += 1
        if interval:
            time.sleep(interval)
    print(n)


if __name__ == "__main__":
    main()
