"""Wire formats: header views over frame buffers and small builders.

Parsing here is struct-on-buffer (no dpkt on the hot path); each module
covers one header. Addresses inside the stack are 4-byte ``bytes``
(``IPv4Address.packed``) and MACs 6-byte ``bytes``: cheap to compare,
hash and splice into headers.
"""


class MalformedFrame(ValueError):
    """A frame that cannot be parsed; ``reason`` names the drop counter."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
