"""Values read from run files or given on the command line, made inert in ``report.md``.

A label in ``summary.json`` or a command in ``config.json`` is data, not markup: whoever wrote
the file must not be able to add HTML (``<script>``), links (``[x](javascript:...)``), table
columns (``|``) or end a code block in a report that someone else opens.
"""

from __future__ import annotations

import re

# Characters that start markup in CommonMark, GitHub's tables or math, escaped with "\"; an
# underscore between two letters or digits (x86_64) cannot start emphasis and is left as it is.
_MARKUP = re.compile(r"([\\`*\[\]|~$]|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z]))")
_BACKTICKS = re.compile(r"`+")


def text(value: object) -> str:
    """``value`` as literal text on one line of markdown: whitespace (newlines too) collapsed,
    ``& < >`` as HTML entities, markup characters backslash-escaped."""
    line = " ".join(str(value).split())
    line = line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MARKUP.sub(r"\\\1", line)


def code_block(content: str) -> list[str]:
    """Lines of a fenced code block showing ``content`` verbatim: the fence is longer than any
    run of backticks inside, so no line of the content can close it."""
    longest = max((len(run) for run in _BACKTICKS.findall(content)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence, *content.splitlines(), fence]
