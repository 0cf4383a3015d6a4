"""``python -m arcbox_net.slirp4netns``: the same as ``arcbox-net-slirp4netns``."""

import sys

from .cli import main

sys.exit(main())
