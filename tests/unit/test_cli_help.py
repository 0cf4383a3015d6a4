"""``twistd arcbox-net --help`` reads cleanly: no stray runs of spaces in option texts.

twistd prints an ``opt_*`` method's docstring as it is, so a docstring written
as indented lines shows its indentation in the middle of the help text.
"""

import re

from twisted.python import usage

from arcbox_net.cli import Options

#: An option line of the usage text: the option column, then its description.
_OPTION_LINE = re.compile(r"^(\s+(?:-\w, )?--[\w-]+=?\s+)(\S.*)$")


def option_texts():
    """{option line: its description as rendered, continuation lines included}."""
    usage = str(Options())
    lines = usage.split("\n")
    start = lines.index("Options:") + 1
    texts, current, column = {}, None, None
    for line in lines[start:]:
        if not line.strip():
            break
        match = _OPTION_LINE.match(line)
        if match:
            if column is None:
                column = len(match.group(1))
            assert len(match.group(1)) == column, f"option column differs: {line!r}"
            current = match.group(1).strip()
            texts[current] = [match.group(2)]
        else:
            assert line[:column].strip() == "", f"continuation outside the column: {line!r}"
            texts[current].append(line[column:])
    return texts


def test_every_option_is_rendered_with_a_text():
    texts = option_texts()
    for name in ("--deny=", "--dns-upstream=", "--forward=", "--map=", "--netns=", "--help"):
        assert name in texts, sorted(texts)
    assert all(" ".join(t).strip() for t in texts.values())


def test_option_texts_have_no_runs_of_spaces():
    bad = {name: lines for name, lines in option_texts().items()
           if any("  " in line.rstrip() or line != line.lstrip() for line in lines)}
    assert not bad, bad


def test_option_docs_are_single_lines_without_runs_of_spaces():
    """The texts as Options gathers them (from optParameters, optFlags and the
    opt_* docstrings), before any wrapping; Twisted's own (--help, --version)
    are left out."""
    twisted_own = set(usage.Options().docs)
    ours = {name: doc for name, doc in Options().docs.items() if name not in twisted_own}
    assert "deny" in ours and "forward" in ours
    bad = {name: doc for name, doc in ours.items()
           if not doc or "\n" in doc or "  " in doc or doc != doc.strip()}
    assert not bad, bad
