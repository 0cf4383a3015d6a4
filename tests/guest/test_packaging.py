"""The twistd plugin is found after a normal (non-editable) install too."""

import os
import subprocess
import sys

from conftest import REPO as ROOT

FIND_PLUGIN = """
import sys
from twisted.plugin import getPlugins
from twisted.application.service import IServiceMaker
import arcbox_net
names = {p.tapname for p in getPlugins(IServiceMaker)}
assert "arcbox-net" in names, names
assert arcbox_net.__file__.startswith(sys.argv[1]), arcbox_net.__file__
print("found", arcbox_net.__file__)
"""


def test_plugin_found_after_a_normal_install(tmp_path):
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), ROOT],
        capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    assert not (target / "twisted" / "__init__.py").exists()
    assert not (target / "twisted" / "plugins" / "__init__.py").exists()
    env = dict(os.environ, PYTHONPATH=str(target))
    # Run from an empty directory so the source tree is not on sys.path.
    result = subprocess.run([sys.executable, "-c", FIND_PLUGIN, str(target)], cwd=tmp_path,
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "found" in result.stdout
