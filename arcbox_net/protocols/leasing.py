"""What the DHCP and DHCPv6 servers share about time: lazy expiry.

Both keep a heap of (expiry, key, address) pushed whenever a lease or
binding is made or extended, so the heap holds stale entries too: an entry
counts only if the table still has that key with that expiry and address.
Declined addresses wait in an insertion-ordered dict until they may be
handed out again. Both are drained on every call into the server, so no
timer is needed and the work is proportional to what expired.
"""

import heapq


def expired(heap, table, now):
    """Pop the heap's due entries; yield (key, entry) for those still current."""
    while heap and heap[0][0] <= now:
        expiry, key, address = heapq.heappop(heap)
        entry = table.get(key)
        if entry is not None and entry.expiry == expiry and entry.address == address:
            yield key, entry


def undeclined(declined, now):
    """Take the addresses whose decline hold has passed out of ``declined``
    ({address: until}, in the order they were declined) and yield them."""
    while declined:
        address, until = next(iter(declined.items()))
        if until > now:
            return
        del declined[address]
        yield address
