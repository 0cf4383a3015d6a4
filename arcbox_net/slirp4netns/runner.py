"""Serve a slirp4netns command line: the TAP from the helper, the stack, the
API socket, ``--exit-fd`` and ``--ready-fd``, on arcbox-net's reactor."""

import os
import sys

from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from . import PROG

log = Logger()


def _start_logging():
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
    observer = FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


@implementer(IReadDescriptor)
class ExitWatch:
    """``--exit-fd``: the caller closes (or writes to) it to make us exit."""

    def __init__(self, fd, on_exit):
        self.fd = fd
        self.on_exit = on_exit

    def fileno(self):
        return self.fd

    def doRead(self):
        self.on_exit("the exit fd became readable")

    def connectionLost(self, reason):
        self.on_exit("the exit fd was closed")

    def logPrefix(self):
        return "exit-fd"


def open_tap(options, config):
    """(fds, offloads) of the TAP the options name: from an inherited fd
    (--netns-type=tapfd) or from the namespace helper."""
    from .nsjoin import open_tap_via_helper
    if options.tap_fd is not None:
        os.set_blocking(options.tap_fd, False)
        return [options.tap_fd], False
    settings = None
    if options.configure:
        settings = dict(address=str(config.guest), prefixlen=config.subnet.prefixlen,
                        gateway=str(config.gateway), mtu=config.mtu, mac=options.macaddress)
    return open_tap_via_helper(options.tap_name, pid=options.target_pid,
                               netns=options.netns_path, userns=options.userns_path,
                               configure=settings)


def make_stack(link, config, options, reactor):
    from ..stack import NetworkStack

    class SlirpStack(NetworkStack):
        """The stack, without its DNS server with --disable-dns."""

        def _add_dns(self):
            if options.disable_dns:
                self.dns = None
            else:
                super()._add_dns()

    return SlirpStack(link, config, reactor=reactor)


def run(options, config):
    """Serve until the exit fd, SIGTERM/SIGINT or the TAP ends it; the exit status."""
    from .nsjoin import JoinError
    _start_logging()
    for note in options.notes:
        log.warn("{note}", note=note)
    try:
        fds, offloads = open_tap(options, config)
    except JoinError as e:
        sys.stderr.write(f"{PROG}: {e}\n")
        return 1

    from ..cli import DEFAULT_BUSY_POLL_US
    from ..reactor import install_unless_chosen
    install_unless_chosen(DEFAULT_BUSY_POLL_US / 1e6)
    from twisted.internet import reactor

    from ..link.tap import TapLink
    from .api import SlirpApi, listen_slirp_api

    where = (f"pid {options.target_pid}" if options.target_pid is not None
             else options.netns_path or f"fd {options.tap_fd}")
    vnet = options.tap_fd is None
    link = TapLink.from_fds(fds, vnet, offloads, f"tap {options.tap_name or '?'} ({where})",
                            config.mtu, reactor)
    stack = make_stack(link, config, options, reactor)
    from ..allocator import tune
    tune()
    ports = []
    status = {"code": 0}

    def fail(message):
        link.stop()
        for port in ports:
            port.stopListening()
        sys.stderr.write(f"{PROG}: {message}\n")
        return 1

    if options.pcap:
        try:
            stack.start_capture(options.pcap)
        except OSError as e:
            return fail(f"cannot write the capture {options.pcap}: {e.strerror or e}")
    if options.api_socket:
        try:
            ports.append(listen_slirp_api(SlirpApi(stack, config.guest), options.api_socket,
                                          reactor))
        except Exception as e:
            return fail(f"cannot listen on the API socket {options.api_socket}: {e}")
    if options.control_api:
        from ..api import listen_api
        try:
            ports.append(listen_api(stack, options.control_api, reactor))
        except Exception as e:
            return fail(f"cannot serve the control API on {options.control_api}: {e}")

    def stop(why, code=0):
        if reactor.running and not status.get("stopping"):
            log.info("exiting: {why}", why=why)
            status["code"] = code
            status["stopping"] = True
            reactor.stop()

    if options.exit_fd is not None:
        watch = ExitWatch(options.exit_fd, stop)
        reactor.addReader(watch)
    stack.whenLinkLost().addCallback(lambda reason: stop(f"the TAP is gone ({reason})", 1))

    def serving():
        stack.startService()
        log.info("slirp4netns plan: network {net}, host {host}, DNS {dns}, guest {guest}, "
                 "MTU {mtu}; host loopback via {host}: {loopback}",
                 net=str(config.subnet), host=str(config.gateway),
                 dns="none" if options.disable_dns else str(config.dns_server),
                 guest=str(config.guest), mtu=config.mtu,
                 loopback="no" if options.disable_host_loopback else "yes")
        if config.ipv6:
            log.info("slirp4netns IPv6 plan: network {net}, host {host}, DNS {dns}, first "
                     "DHCPv6 address {guest}; router advertisements from {router}",
                     net=str(config.ipv6_subnet), host=str(config.gateway6),
                     dns="none" if options.disable_dns else str(config.dns6),
                     guest=str(config.guest6), router=str(config.router_link_local))
        else:
            log.info("no IPv6 (as slirp4netns without -6): IPv6 frames are dropped")
        if options.ready_fd is not None:
            def ready(_):
                try:
                    os.write(options.ready_fd, b"1")
                except OSError as e:
                    log.warn("cannot write to the ready fd: {e}", e=e)
                finally:
                    os.close(options.ready_fd)
            stack.whenReady().addCallbacks(ready, lambda f: os.close(options.ready_fd))

    reactor.addSystemEventTrigger("before", "shutdown", status.__setitem__, "stopping", True)
    reactor.callWhenRunning(serving)
    reactor.run()
    if stack.running:
        stack.stopService()
    for port in ports:
        port.stopListening()
    if options.api_socket:
        try:
            os.unlink(options.api_socket)
        except OSError:
            pass
    return status["code"]

