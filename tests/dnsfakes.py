"""DNS test helpers shared by the unit and the guest tests: queries built and
read with twisted.names, and a fake upstream resolver answering from a table."""

import struct

from twisted.internet import defer
from twisted.names import dns, error

GATEWAY = "10.0.2.1"
BIG = [f"198.51.100.{i}" for i in range(1, 41)]


def query(name, qtype=dns.A, qid=4242, edns_size=None, edns_version=0, rd=1, opcode=dns.OP_QUERY,
          cls=dns.IN):
    """Wire form of a query, OPT record built by hand (independent of the code under test)."""
    m = dns.Message(id=qid, recDes=rd, opCode=opcode)
    m.queries = [dns.Query(name, qtype, cls)]
    wire = m.toStr()
    if edns_size is not None:
        wire = wire[:10] + struct.pack("!H", 1) + wire[12:]
        wire += b"\x00" + struct.pack("!HHIH", dns.OPT, edns_size, edns_version << 16, 0)
    return wire


def decode(wire):
    m = dns.Message()
    m.fromStr(wire)
    return m


def addresses(m):
    return [r.payload.dottedQuad() for r in m.answers if r.type == dns.A]


class FakeUpstream:
    """An IResolver stand-in: answers from a table, counts queries, can hang."""

    def __init__(self, table=None):
        self.table = table or {}
        self.queries = []
        self.hanging = []

    def query(self, q, timeout=None):
        self.queries.append(q)
        result = self.table.get((q.name.name.lower(), q.type))
        if result is None:
            result = self.table.get(q.name.name.lower())
        if result == "hang":
            d = defer.Deferred()
            self.hanging.append(d)
            return d
        if isinstance(result, Exception):
            return defer.fail(result)
        if result is None:
            return defer.fail(error.DNSServerError(None))
        return defer.succeed(result)


def a_records(name, addrs, ttl=300):
    return [dns.RRHeader(name, dns.A, dns.IN, ttl, dns.Record_A(a, ttl=ttl)) for a in addrs]


def soa(zone=b"example.test", ttl=30):
    return dns.RRHeader(zone, dns.SOA, dns.IN, ttl,
                        dns.Record_SOA(mname=b"ns." + zone, rname=b"admin." + zone,
                                       minimum=ttl, ttl=ttl))


def upstream_message(rcode, authority=()):
    m = dns.Message(answer=1, rCode=rcode)
    m.authority = list(authority)
    return m


def standard_table():
    return {
        b"www.example.test": (a_records(b"www.example.test", ["192.0.2.10"]), [], []),
        b"big.example.test": (a_records(b"big.example.test", BIG), [], []),
        b"nodata.example.test": ([], [soa()], []),
        b"missing.example.test": error.DNSNameError(
            upstream_message(dns.ENAME, [soa()])),
        b"refused.example.test": error.DNSQueryRefusedError(upstream_message(dns.EREFUSED)),
        b"broken.example.test": error.DNSServerError(upstream_message(dns.ESERVER)),
        b"slow.example.test": "hang",
    }
