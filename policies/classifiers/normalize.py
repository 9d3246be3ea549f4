"""Text normalisation against evasion: case, Unicode confusables and NFKC, leetspeak, inserted separators.

`variants(text)` returns a few normalised spellings of a prompt; lexical rules match if any variant matches.
Word boundaries are kept in every variant, so normalisation never glues ordinary words into new ones
except where single characters were spaced out on purpose ("n u d e" -> "nude").
"""

from __future__ import annotations

import re
import unicodedata

NORMALISER_VERSION = "1"

# Zero-width and invisible characters used to split words without visible spaces.
_INVISIBLE = dict.fromkeys(map(ord, "\u00ad\u180e\u200b\u200c\u200d\u200e\u200f\u2060\u2061\u2062\u2063\ufeff"))

# Letters that look like Latin ones (after casefolding); NFKC does not map these.
_CONFUSABLES = str.maketrans({
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "ё": "e", "з": "3", "і": "i", "ї": "i", "ј": "j", "к": "k", "м": "m",
    "н": "h", "о": "o", "р": "p", "с": "c", "т": "t", "у": "y", "х": "x", "ѕ": "s", "ԁ": "d", "һ": "h",
    "ӏ": "l", "ԛ": "q", "ԝ": "w", "ь": "b", "п": "n", "г": "r", "д": "d", "л": "n", "ц": "u",
    # Greek
    "α": "a", "β": "b", "γ": "y", "ε": "e", "η": "n", "ι": "i", "κ": "k", "μ": "u", "ν": "v", "ο": "o",
    "ρ": "p", "σ": "o", "ς": "c", "τ": "t", "υ": "u", "χ": "x", "ω": "w", "ϲ": "c",
    # Latin look-alikes
    "ı": "i", "ɑ": "a", "ɡ": "g", "ɩ": "i", "ʟ": "l", "ɪ": "i", "ɴ": "n", "ʀ": "r", "ꜱ": "s", "ᴀ": "a",
    "ᴄ": "c", "ᴅ": "d", "ᴇ": "e", "ᴋ": "k", "ᴍ": "m", "ᴏ": "o", "ᴘ": "p", "ᴛ": "t", "ᴜ": "u", "ᴠ": "v",
    "ᴡ": "w", "ᴢ": "z", "ø": "o", "ð": "d", "þ": "p", "ß": "ss", "æ": "ae", "œ": "oe", "ł": "l", "đ": "d",
})

_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g",
                       "@": "a", "$": "s", "!": "i", "|": "l", "€": "e", "£": "l", "+": "t"})
_LEET_CHARS = frozenset("0134578 9@$!|€£+".replace(" ", ""))

_NON_WORD = re.compile(r"[^0-9a-z]+")
_SPACES = re.compile(r"\s+")


def fold(text: str) -> str:
    """NFKC, invisible characters removed, diacritics stripped, casefolded, confusables mapped."""
    text = unicodedata.normalize("NFKC", text).translate(_INVISIBLE)
    decomposed = unicodedata.normalize("NFD", text.casefold())
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return unicodedata.normalize("NFC", stripped).translate(_CONFUSABLES)


def _deleet(token: str) -> str:
    # Only mostly-letter tokens with leet symbols are decoded, so "1920s" or "35mm" stay numbers.
    letters = sum(c.isalpha() for c in token)
    leet = sum(c in _LEET_CHARS for c in token)
    if letters and leet and letters >= leet:
        return token.translate(_LEET)
    return token


def _join_spaced_letters(tokens: list[str], keep_article: bool) -> list[str]:
    """Collapse runs of 3+ single characters ("n u d e") into one token.

    With `keep_article`, a run's leading "a" or "i" stays a word of its own ("a n u d e" -> "a nude").
    """
    out: list[str] = []
    run: list[str] = []
    for token in tokens + [""]:
        if len(token) == 1:
            run.append(token)
            continue
        if keep_article and len(run) >= 4 and run[0] in ("a", "i"):
            out.append(run.pop(0))
        if len(run) >= 3:
            out.append("".join(run))
        else:
            out.extend(run)
        run = []
        if token:
            out.append(token)
    return out


def variants(text: str) -> tuple[str, ...]:
    """Normalised spellings of `text`, each a space-separated string of [a-z0-9] words."""
    folded = fold(text)
    plain = _SPACES.sub(" ", _NON_WORD.sub(" ", folded)).strip()
    decoded = [t for t in (_NON_WORD.sub("", _deleet(token)) for token in folded.split()) if t]
    spellings = [plain]
    for tokens in (decoded, plain.split()):
        spellings += [" ".join(_join_spaced_letters(tokens, keep)) for keep in (False, True)]
    return tuple(dict.fromkeys(spellings))
