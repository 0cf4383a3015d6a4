"""``arcbox-net-slirp4netns``: arcbox-net behind slirp4netns 1.2's command line.

rootlesskit (``--slirp4netns-binary``) and rootless Podman (containers.conf
``network_cmd_path``) start slirp4netns for every container network; this
package lets them start arcbox-net instead, unchanged. ``cli`` parses the
command line and maps it onto a StackConfig with slirp4netns's address plan,
``nsjoin`` is the single-threaded helper process that joins the target's
namespaces and hands back the TAP's fd, ``api`` speaks slirp4netns's JSON API
over the stack's ordinary forwards, and ``runner`` serves it all on the
reactor.
"""

#: The console script's name, the prefix of its one-line errors.
PROG = "arcbox-net-slirp4netns"
