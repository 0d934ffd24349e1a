"""Griffe extension: Sphinx roles in docstrings (``:class:`X```, ``:func:`f```, ...) become code spans.

The docstrings are written for both ``help()`` and the site; the roles would otherwise appear verbatim."""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):`~?([^`]+)`")


class SphinxRolesToCode(griffe.Extension):
    """Rewrite ``:role:`target``` to ```target``` in every docstring griffe loads."""

    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(r"`\1`", obj.docstring.value)
