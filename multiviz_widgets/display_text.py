"""Data shown in the app's own sentences (captions, tooltips, titles): quoted and isolated
so that it reads as written and never reorders the words around it. Plain text for textContent
sinks (never HTML: nothing here escapes markup, and nothing needs to). Used by the engine's
captions and by the views."""
from __future__ import annotations

import unicodedata

#: The bidi controls that open or close an embedding, override or isolate (LRE, RLE, PDF, LRO,
#: RLO; LRI, RLI, FSI, PDI): inside a piece of data they could reorder or close more than the
#: piece itself, so ``isolate`` shows them escaped, as repr does ("\u202e").
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
#: FIRST STRONG ISOLATE ... POP DIRECTIONAL ISOLATE (Unicode's bidi algorithm, UAX #9)
FSI, PDI = "\u2068", "\u2069"


def isolate(text) -> str:
    """``text`` (from data: a description, a class name) ready to be joined with the app's own
    words in one line: its bidi controls escaped ("\\u202e"), and the whole between FSI and
    PDI, so that its direction (right-to-left words, a stray RIGHT-TO-LEFT OVERRIDE) never
    reorders the words around it ("| predicted: yes" after a description). "" stays ""."""
    text = "" if text is None else str(text)
    if not text:
        return ""
    if not BIDI_CONTROLS.isdisjoint(text):
        text = "".join(f"\\u{ord(ch):04x}" if ch in BIDI_CONTROLS else ch for ch in text)
    return f"{FSI}{text}{PDI}"


#: The bidi classes (UAX #9) of the characters that can make a run of text right-to-left in a
#: left-to-right line (Hebrew and Arabic letters, Arabic digits; the marks RLM and ALM), and of
#: the explicit controls: text holding none of them cannot reorder the words around it.
RTL_CLASSES = frozenset({"R", "AL", "AN", "LRE", "RLE", "PDF", "LRO", "RLO", "LRI", "RLI", "FSI",
                         "PDI"})


def embed(text) -> str:
    """``text`` (from data: a token, a description) ready to be joined with the app's own words:
    as ``isolate`` gives it when it holds a character that could reorder them (a right-to-left
    letter or digit, a bidi control: a Hebrew unit name pulls the "(#3" after it into its
    right-to-left run), else as it is, so that the common left-to-right text ("color",
    "C:\\data") reads, copies and compares as written. "" stays ""."""
    text = "" if text is None else str(text)
    if any(unicodedata.bidirectional(ch) in RTL_CLASSES for ch in text):
        return isolate(text)
    return text


#: The characters ``quoted`` escapes, as repr writes them: control characters (a newline would
#: break a caption's line, most others show as nothing) and the line and paragraph separators.
UNSEEN_CATEGORIES = ("Cc", "Zl", "Zp")
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(ch: str) -> str:
    if unicodedata.category(ch) not in UNSEEN_CATEGORIES:
        return ch
    return _SHORT_ESCAPES.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100
                                      else f"\\u{ord(ch):04x}")


def quoted(text) -> str:
    """``text`` (from data: a class name, a unit's name) between quotes, for a caption or a
    tooltip: "class 'C:\\data'", "unit '\\frac'". repr, which they used before, doubled every
    backslash, so a name read otherwise than in the input chip and the menus. Only what a line
    cannot show is escaped, as repr writes it (a newline "\\n", a tab "\\t", "\\x1b",
    "\\u2028"), and the text is isolated as ``embed`` does (a bidi control escaped,
    "\\u202e"); a quote inside stays as it is (the text is not Python)."""
    text = "" if text is None else str(text)
    return "'" + embed("".join(map(_escaped, text))) + "'"


def and_list(items) -> str:
    """Pieces of a sentence listed: "a and b", "a, b and c" ("a" for one, "" for none)."""
    items = list(items)
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else "".join(items)
