"""A small PromQL reader: enough to tell metric names from functions, labels and keywords in the
dashboard's and the rules' expressions (no PromQL parser is packaged for Python; promtool checks syntax,
this finds which series an expression reads and through which function)."""

from __future__ import annotations

import re

GROUPING_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
BINARY_KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2"}

TOKEN = re.compile(
    r"""
      (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    | (?P<range>\[[^\]]*\])
    | (?P<number>\d+(?:\.\d+)?(?:e[+-]?\d+)?)
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<variable>\$\w+)
    | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=,(){}])
    | (?P<space>\s+)
    """,
    re.VERBOSE,
)


def tokens(expr: str) -> list[tuple[str, str]]:
    found, position = [], 0
    while position < len(expr):
        match = TOKEN.match(expr, position)
        assert match, f"cannot read {expr[position:]!r} in {expr!r}"
        if match.lastgroup != "space":
            found.append((match.lastgroup, match.group()))
        position = match.end()
    return found


def selectors(expr: str) -> list[dict]:
    """Each metric selector: its name, label matchers text, range, and the function that encloses it."""
    toks = tokens(expr)
    found = []
    calls: list[str | None] = []  # the function (or None for a plain parenthesis) of each open "("
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        following = toks[i + 1] if i + 1 < len(toks) else (None, None)
        if kind == "op" and text == "(":
            calls.append(None)
        elif kind == "op" and text == ")":
            calls.pop()
        elif kind == "ident" and text in GROUPING_KEYWORDS:
            if following[1] == "(":  # by (le, path): label names, not metrics
                i = next(j for j in range(i, len(toks)) if toks[j][1] == ")")
        elif kind == "ident" and following[1] == "(":
            calls.append(text)
            i += 1
        elif kind == "ident" and following[1] in ("by", "without"):  # sum by (le) (...)
            close = next(j for j in range(i, len(toks)) if toks[j][1] == ")")
            assert toks[close + 1][1] == "(", expr
            calls.append(text)
            i = close + 1
        elif kind == "ident" and text not in BINARY_KEYWORDS:
            selector = {"name": text, "matchers": "", "range": None, "function": calls[-1] if calls else None}
            if following[1] == "{":
                end = next(j for j in range(i + 1, len(toks)) if toks[j][1] == "}")
                selector["matchers"] = "".join(t for _, t in toks[i + 2 : end])
                i = end
            if i + 1 < len(toks) and toks[i + 1][0] == "range":
                selector["range"] = toks[i + 1][1]
                i += 1
            found.append(selector)
        i += 1
    assert not calls, f"unbalanced parentheses in {expr!r}"
    return found
