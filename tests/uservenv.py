"""A venv an unprivileged user can run, holding this tree's arcbox-net.

The rootless tests and the bench's rootlesskit stacks run arcbox-net as a
user of their own, who cannot read this tree's .venv (its interpreter may
live under /root). So: a venv of Debian's /usr/bin/python3 without pip, the
runtime dependencies copied from our venv's site-packages (the distributions
arcbox-net requires, transitively, without extras), this tree's arcbox_net
package over them, and the console script with the new venv's shebang.
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The console script installed beside our interpreter.
SCRIPT = os.path.join(os.path.dirname(sys.executable), "arcbox-net-slirp4netns")


def make_user_venv(dest):
    """Build the venv at ``dest``; (its python, its arcbox-net-slirp4netns)."""
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", dest], check=True,
                   capture_output=True)
    python = os.path.join(dest, "bin", "python")
    site = subprocess.run([python, "-c", "import sysconfig; "
                           "print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    seen = {}

    def walk(name):
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            return
        try:
            seen[key] = dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            return
        for req in dist.requires or []:
            if "extra ==" not in req:
                walk(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])
    walk("arcbox-net")
    ours = sysconfig.get_paths()["purelib"]
    for top in sorted({f.parts[0] for dist in seen.values() for f in dist.files or []}):
        src = os.path.join(ours, top)
        if top in ("..", "__pycache__") or top.endswith(".pth") or not os.path.exists(src):
            continue
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(site, top), dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, site)
    shutil.copytree(os.path.join(REPO, "arcbox_net"), os.path.join(site, "arcbox_net"),
                    dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    with open(SCRIPT) as f:
        body = f.read().split("\n", 1)[1]
    script = os.path.join(dest, "bin", "arcbox-net-slirp4netns")
    with open(script, "w") as f:
        f.write(f"#!{python}\n{body}")
    os.chmod(script, 0o755)
    return python, script
