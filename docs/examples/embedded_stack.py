"""Embedding arcbox-net in a Twisted program: no twistd, no HTTP API.

Serves a TAP inside network namespace NS, forwards host port HOST_PORT to
the guest's port 80, prints every event (lease granted, connections
opened/closed, forwards added/removed) as one JSON line, and stops after
SECONDS (or when the guest link goes away).

    python docs/examples/embedded_stack.py NS HOST_PORT SECONDS
"""

import json
import sys

from twisted.internet import defer, task

from arcbox_net import NetworkStack, StackConfig
from arcbox_net.link.tap import TapLink


@defer.inlineCallbacks
def main(reactor, netns, host_port, seconds):
    config = StackConfig(mtu=1500, deny=["0.0.0.0/0"], allow=["127.0.0.0/8"])
    stack = NetworkStack(TapLink.open_in_netns(netns, "tap0", mtu=config.mtu), config,
                         reactor=reactor)
    stack.subscribe(lambda kind, details: print(json.dumps({"event": kind, **details}),
                                                flush=True))
    stack.startService()
    forward = yield stack.add_forward(f"tcp:127.0.0.1:{host_port}:80")
    print(json.dumps({"forward": forward}), flush=True)
    print("ready", flush=True)

    done = defer.Deferred()
    stack.whenLinkLost().addCallback(lambda reason: done.callback("link lost"))
    timer = reactor.callLater(seconds, done.callback, "time is up")
    why = yield done
    if timer.active():
        timer.cancel()
    yield stack.remove_forward(forward["id"])
    print(json.dumps({"leases": stack.leases(), "stats": stack.stats()["counters"]}), flush=True)
    if stack.running:
        stack.stopService()
    print("stopped:", why, flush=True)


if __name__ == "__main__":
    task.react(main, (sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
