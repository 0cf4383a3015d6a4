"""arcbox-net: a user-mode network stack for virtual machines and containers.

The embedding API is ``NetworkStack`` (an IService), ``StackConfig`` and the
links in ``arcbox_net.link``; see docs/embedding.md.
"""

from .config import ConfigError, StackConfig

__all__ = ["ConfigError", "NetworkStack", "StackConfig"]


def __getattr__(name):
    # Imported lazily: importing the stack imports the reactor.
    if name == "NetworkStack":
        from .stack import NetworkStack
        return NetworkStack
    raise AttributeError(name)
