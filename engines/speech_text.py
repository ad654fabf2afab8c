"""The text front end every TTS engine shares: from a request's text to the sentences a
voice speaks, with the pauses between them.

One path, in this order (`SpeechText.parse`, then `SpeechText.sentences`):
1. Type and length checks on the raw text (`max_text_chars`, before any other work).
2. SSML subset: text holding a `<speak>` or `<break>` tag is read as SSML. `speak`, `p`,
   `s` and `break` (`time="500ms"`/`"1.5s"`, or `strength`) are honoured; any other tag is
   removed and its content spoken; XML entities are decoded. Text without those tags is
   plain text, so "a < b" stays as written.
3. Cleaning as `audio.validate_text` does (controls dropped, NFC).
4. Script check (issue 16, item 2): the letters' Unicode scripts against the scripts of
   the voice's languages. Text mostly in scripts the voice cannot read is refused with
   `EngineInputError("text", ...)` naming the script and the voice's languages (an engine
   may first route it to a voice for that language: `route_voice`). A few foreign words
   are allowed: runs in a foreign non-Latin script are left out (a voice would spell them
   as "Chinese letter"), Latin runs are kept (every espeak voice reads Latin).
5. Normalisation (issue 16, item 11) in the voice's language: numbers, currency, percent,
   ordinals, fractions, years, ISO and slash dates, times, phone numbers and Roman
   numerals become words (num2words);
   emoji and other symbols without speech are dropped.
6. Sentence split (`audio.split_sentences`); an SSML break becomes silence after the
   sentence before it.

Pure Python with two small dependencies: `num2words` (LGPL-2.1, number words in ~50
languages) and `unicodedataplus` (Apache-2.0, the Unicode Script property). Both are
imported here only, and docs/engines.md says why they were chosen.
"""

from __future__ import annotations

import calendar
import html
import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import numpy as np

from .audio import (
    DEFAULT_MAX_SENTENCE_CHARS,
    DEFAULT_MAX_TEXT_CHARS,
    clean_text,
    split_sentences,
)
from .base import EngineInputError

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- languages

# Scripts (Unicode Script property values) each language is written in, by ISO 639 code.
# Japanese and Korean mix scripts; Serbian is written in both Cyrillic and Latin.
_LATIN_LANGUAGES = (
    "af ast az br bs ca co cs cy da de en eo es et eu fi fil fo fr fy ga gd gl gn ha haw hr "
    "ht hu id ig is it jv la lb lt lv mg mi ms mt nb nl nn no oc om pl pt qu rm ro rw sk sl "
    "sm sn so sq st su sv sw tk tl tn to tr uz vi wa wo xh yo zu"
).split()
_LANGUAGE_SCRIPTS: dict[str, frozenset[str]] = {
    **{code: frozenset({"Latin"}) for code in _LATIN_LANGUAGES},
    **{code: frozenset({"Cyrillic"}) for code in
       "ru uk be bg mk kk ky mn tg tt ba cv ce os".split()},
    "sr": frozenset({"Cyrillic", "Latin"}),
    **{code: frozenset({"Arabic"}) for code in "ar fa ur ps sd ug ckb ku".split()},
    **{code: frozenset({"Hebrew"}) for code in "he iw yi".split()},
    "el": frozenset({"Greek"}), "hy": frozenset({"Armenian"}), "ka": frozenset({"Georgian"}),
    **{code: frozenset({"Devanagari"}) for code in "hi mr ne sa kok mai".split()},
    **{code: frozenset({"Bengali"}) for code in "bn as".split()},
    "pa": frozenset({"Gurmukhi"}), "gu": frozenset({"Gujarati"}), "or": frozenset({"Oriya"}),
    "ta": frozenset({"Tamil"}), "te": frozenset({"Telugu"}), "kn": frozenset({"Kannada"}),
    "ml": frozenset({"Malayalam"}), "si": frozenset({"Sinhala"}), "th": frozenset({"Thai"}),
    "lo": frozenset({"Lao"}), "km": frozenset({"Khmer"}), "my": frozenset({"Myanmar"}),
    "bo": frozenset({"Tibetan"}), "dv": frozenset({"Thaana"}),
    **{code: frozenset({"Ethiopic"}) for code in "am ti".split()},
    **{code: frozenset({"Han"}) for code in "zh cmn yue wuu".split()},
    "ja": frozenset({"Han", "Hiragana", "Katakana"}),
    "ko": frozenset({"Hangul", "Han"}),
}
# Scripts written without spaces between words: touching runs of them are one word.
_UNSPACED_SCRIPTS = frozenset({"Han", "Hiragana", "Katakana", "Thai", "Lao", "Khmer",
                               "Myanmar", "Tibetan"})
# The languages most people who write a script speak, named first in hints ("set
# voices_by_language for ru/uk/..."); the table's order would name Bashkir first.
_MAIN_LANGUAGES: dict[str, tuple[str, ...]] = {
    "Latin": ("en", "es", "fr", "de", "pt", "it"), "Cyrillic": ("ru", "uk", "sr", "bg"),
    "Arabic": ("ar", "fa", "ur"), "Hebrew": ("he",), "Devanagari": ("hi", "mr", "ne"),
    "Bengali": ("bn",), "Han": ("zh", "ja"), "Hiragana": ("ja",), "Katakana": ("ja",),
    "Hangul": ("ko",), "Ethiopic": ("am",),
}
# Text whose words are at least this share in scripts the voice cannot read is refused; below
# it the text is spoken (a few foreign words in a sentence).
FOREIGN_SHARE_LIMIT = 0.5


def language_base(code: str) -> str:
    """"en" of "en_US", "en-us", "EN"; "zh" of "zh-cn"."""
    return re.split(r"[-_]", code.strip(), maxsplit=1)[0].lower()


def language_scripts(code: str) -> frozenset[str] | None:
    """The scripts language `code` is written in, or None for a language not in the table
    (its text is then not checked)."""
    return _LANGUAGE_SCRIPTS.get(language_base(code))


def languages_for_script(script: str) -> list[str]:
    """Language codes written in `script`, for hints in error messages: its main languages
    first ("ru", "uk" for Cyrillic), then the others, shortest code first."""
    codes = [code for code, scripts in _LANGUAGE_SCRIPTS.items() if script in scripts]
    main = [code for code in _MAIN_LANGUAGES.get(script, ()) if code in codes]
    return main + sorted(set(codes) - set(main), key=lambda code: (len(code), code))


def languages_for_scripts(words_by_script: Mapping[str, int]) -> list[str]:
    """Language codes for text whose words are in these scripts (script -> words), best
    first: those that read the most of the words (Japanese for Han with kana), then in the
    order `languages_for_script` gives, the script with the most words first."""
    order: dict[str, int] = {}
    for script in sorted(words_by_script, key=lambda script: -words_by_script[script]):
        for code in languages_for_script(script):
            order.setdefault(code, len(order))

    def covered(code: str) -> int:
        return sum(n for script, n in words_by_script.items() if script in _LANGUAGE_SCRIPTS[code])

    return sorted(order, key=lambda code: (-covered(code), order[code]))


def char_script(ch: str) -> str:
    """The Unicode Script of a character; characters shared by several scripts (Common,
    Inherited: digits, punctuation, combining marks, the Japanese prolonged-sound mark)
    take the first script of their Script_Extensions when that names one."""
    import unicodedataplus

    script = unicodedataplus.script(ch)
    if script in ("Common", "Inherited"):
        extensions = unicodedataplus.script_extensions(ch)
        if extensions and extensions[0] not in ("Zyyy", "Zinh"):
            return _SCRIPT_CODE_NAMES.get(extensions[0], script)
    return script


# Script_Extensions come as ISO 15924 codes; the few that matter for speech.
_SCRIPT_CODE_NAMES = {"Hira": "Hiragana", "Kana": "Katakana", "Hani": "Han", "Arab": "Arabic",
                      "Deva": "Devanagari", "Beng": "Bengali", "Cyrl": "Cyrillic",
                      "Latn": "Latin", "Grek": "Greek", "Hang": "Hangul"}


@dataclass(frozen=True)
class ScriptRun:
    """A maximal run of letters (with their marks) of one script: text[start:end]. A run
    is one word, also in scripts written without spaces (Han, kana, Thai...), where a run
    is a phrase: counting its characters made a name in an English sentence ("Tokyo 東京")
    outweigh the sentence. Runs of such scripts that touch ("寿司を食べる": Han, kana, Han,
    kana) are one word together: the first has `words` 1, the others 0."""

    script: str
    start: int
    end: int
    words: int = 1


def script_runs(text: str) -> list[ScriptRun]:
    """The runs of letters in `text`, by script. Digits, punctuation and symbols belong to
    no run; combining marks join the run they follow."""
    runs: list[ScriptRun] = []
    script = ""
    start = 0
    for index, ch in enumerate(text):
        category = unicodedata.category(ch)
        if category.startswith("M") and script:
            continue  # a mark of the current run
        this = char_script(ch) if category.startswith("L") else ""
        if this != script:
            if script:
                runs.append(_run(runs, script, start, index))
            script, start = this, index
    if script:
        runs.append(_run(runs, script, start, len(text)))
    return runs


def _run(runs: list[ScriptRun], script: str, start: int, end: int) -> ScriptRun:
    before = runs[-1] if runs else None
    continues = (before is not None and before.end == start and script in _UNSPACED_SCRIPTS
                 and before.script in _UNSPACED_SCRIPTS)
    return ScriptRun(script, start, end, 0 if continues else 1)


@dataclass(frozen=True)
class ScriptCheck:
    """How much of a text a set of languages can read."""

    words: int  # words in any script
    foreign: Counter  # script -> words in scripts the languages do not use
    foreign_runs: tuple[ScriptRun, ...]

    @property
    def foreign_words(self) -> int:
        return sum(self.foreign.values())

    @property
    def speakable(self) -> bool:
        return self.words == 0 or self.foreign_words < FOREIGN_SHARE_LIMIT * self.words


def check_scripts(text: str, languages: Sequence[str]) -> ScriptCheck | None:
    """Compare the scripts of `text` with those of `languages`; None when no language is
    in the table (nothing to compare with)."""
    known = [language_scripts(code) for code in languages]
    readable = frozenset().union(*(s for s in known if s is not None))
    if not readable:
        return None
    runs = script_runs(text)
    foreign_runs = tuple(run for run in runs if run.script not in readable)
    foreign: Counter = Counter()
    for run in foreign_runs:
        foreign[run.script] += run.words
    return ScriptCheck(sum(run.words for run in runs), foreign, foreign_runs)


def route_voice(text: str, voice: str | None, default_voice: str,
                voice_languages: Mapping[str, Sequence[str]],
                voices_by_language: Mapping[str, str]) -> str:
    """The voice to speak `text` with: the one asked for, else the default voice when it
    can read the text, else the first voice of `voices_by_language` whose language can,
    else the default (whose check then refuses the text with a clear error)."""
    if voice is not None:
        return voice
    check = check_scripts(text, voice_languages[default_voice])
    if check is None or check.speakable:
        return default_voice
    for language, routed in voices_by_language.items():
        routed_check = check_scripts(text, [language])
        if routed_check is not None and routed_check.speakable:
            log.info("text in %s goes to voice %r (%s)", ", ".join(check.foreign), routed,
                     language)
            return routed
    return default_voice


# ---------------------------------------------------------------------------- SSML

_SSML_MARKER = re.compile(r"<\s*(?:speak|break)\b", re.IGNORECASE)
_TAG = re.compile(r"<!--.*?-->|<\?.*?\?>|<!\[CDATA\[.*?\]\]>|<[^<>]*>", re.DOTALL)
_TAG_NAME = re.compile(r"<\s*(/?)\s*([A-Za-z][\w:.-]*)")
_ATTRIBUTE = re.compile(r"""([\w:.-]+)\s*=\s*(?:"([^"]*)"|'([^']*)')""")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s)\s*$", re.IGNORECASE)
# Pause lengths of <break strength=...>, and of a bare <break/> (medium), in seconds.
BREAK_STRENGTH_S = {"none": 0.0, "x-weak": 0.1, "weak": 0.25, "medium": 0.5,
                    "strong": 0.75, "x-strong": 1.0}
MAX_BREAK_S = 10.0  # longer breaks are refused: a typo ("500s") would stall a job


@dataclass(frozen=True)
class Block:
    """Text that ends at an SSML boundary (p, s, break) and the silence after it."""

    text: str
    pause_s: float = 0.0


def parse_ssml(text: str) -> list[Block]:
    """Blocks of `text`: one block for plain text; for SSML, one per p/s/break boundary."""
    if not _SSML_MARKER.search(text):
        return [Block(text)]
    blocks: list[Block] = []
    pending: list[str] = []

    def close(pause_s: float) -> None:
        blocks.append(Block(html.unescape("".join(pending)), pause_s))
        pending.clear()

    position = 0
    for match in _TAG.finditer(text):
        pending.append(text[position : match.start()])
        position = match.end()
        tag = _TAG_NAME.match(match.group())
        if tag is None:
            continue  # a comment, processing instruction or CDATA marker: not spoken
        name = tag.group(2).lower().rpartition(":")[2]
        if name == "break":
            close(_break_seconds(match.group()))
        elif name in ("p", "s", "speak"):
            close(0.0)
        else:
            pending.append(" ")  # an unsupported tag: removed, its content is spoken
    pending.append(text[position:])
    close(0.0)
    return blocks


def _break_seconds(tag: str) -> float:
    attributes = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
                  for m in _ATTRIBUTE.finditer(tag)}
    if "time" in attributes:
        duration = _DURATION.match(attributes["time"])
        if duration is None:
            raise EngineInputError("text", f"SSML <break time={attributes['time']!r}> is not a "
                                   "duration such as 500ms or 1.5s")
        seconds = float(duration.group(1)) / (1000.0 if duration.group(2).lower() == "ms"
                                              else 1.0)
        if seconds > MAX_BREAK_S:
            raise EngineInputError("text", f"SSML <break time={attributes['time']!r}> is longer "
                                   f"than {MAX_BREAK_S:g} s")
        return seconds
    strength = attributes.get("strength", "medium").lower()
    if strength not in BREAK_STRENGTH_S:
        raise EngineInputError("text", f"SSML <break strength={strength!r}> is not one of "
                               f"{', '.join(BREAK_STRENGTH_S)}")
    return BREAK_STRENGTH_S[strength]


# ---------------------------------------------------------------------------- normalising

# Characters dropped as having no speech: emoji and pictographs (So), enclosing keycaps
# (Me), skin-tone modifiers, variation selectors, emoji tag characters and the joiner that
# glues emoji sequences. Currency (Sc) and maths (Sm) signs stay: they are spoken.
_NO_SPEECH_CATEGORIES = frozenset({"So", "Me"})
_NO_SPEECH_RANGES = ((0xFE00, 0xFE0F), (0x1F3FB, 0x1F3FF), (0xE0020, 0xE007F))
_ZWJ = "\u200d"


def _no_speech(ch: str) -> bool:
    code = ord(ch)
    return (unicodedata.category(ch) in _NO_SPEECH_CATEGORIES
            or any(low <= code <= high for low, high in _NO_SPEECH_RANGES))


def drop_symbols(text: str) -> str:
    """`text` without emoji and other symbols that have no speech (a ZWJ goes with them)."""
    kept: list[str] = []
    for index, ch in enumerate(text):
        if _no_speech(ch):
            kept.append(" ")
        elif ch == _ZWJ and (
            (index > 0 and _no_speech(text[index - 1]))
            or (index + 1 < len(text) and _no_speech(text[index + 1]))
        ):
            continue
        else:
            kept.append(ch)
    return "".join(kept)


_NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
_SCALE = r"thousand|million|billion|trillion"
_CURRENCY_SYMBOLS = {"$": "USD", "€": "EUR", "£": "GBP", "₹": "INR", "¥": "JPY"}
# Names for currencies num2words lacks in English: (singular, plural).
_EN_CURRENCY_NAMES = {"JPY": ("yen", "yen")}
_CURRENCY = re.compile(rf"([$€£₹¥])\s?({_NUMBER})(?:\s?({_SCALE})\b)?")
_PERCENT = re.compile(rf"({_NUMBER})\s?%")
_ORDINAL = re.compile(r"\b(\d+)(st|nd|rd|th)\b", re.IGNORECASE)
_FRACTION = re.compile(r"(?<![\d/])(\d{1,3})/(\d{1,3})(?![\d/])")
_ISO_DATE = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b")
_YEAR_CONTEXT = re.compile(
    r"\b(in|since|by|from|until|till|of|year|around|circa|before|after|during|to|and|"
    r"the|early|late|mid|summer|winter|spring|autumn|fall)\s+(1[1-9]\d\d|20\d\d)\b(?!,\d)",
    re.IGNORECASE,
)
_YEAR_RANGE = re.compile(r"\b(1[1-9]\d\d|20\d\d)\s?[-\u2013]\s?(1[1-9]\d\d|20\d\d)\b")
_DECADE = re.compile(r"\b(1[1-9]|20)([1-9]0)s\b")
_PLAIN_NUMBER = re.compile(rf"(?<![\w.])((?<![\w-])-)?({_NUMBER})(?![\w])")
_LONG_DIGITS = 13  # longer digit strings (ids, phone numbers) are read digit by digit
_ROMAN = re.compile(r"\b([A-Z][a-z]+)\s+([IVX]+)\b")
# Words after which a Roman numeral is a cardinal ("World War II", "Chapter IV"); after
# another capitalised word it is a regnal ordinal ("Henry VIII": Henry the eighth).
_ROMAN_CARDINAL_AFTER = frozenset(
    "war chapter part volume vol book act scene phase stage type class level section article "
    "title round episode season apollo gemini grade category tier mark".split())
_ROMAN_VALUES = {"I": 1, "V": 5, "X": 10}
_MONTHS = ("January February March April May June July August September October November "
           "December").split()
_FRACTION_NAMES = {2: ("half", "halves"), 4: ("quarter", "quarters")}
# Denominators that make "a/b" (a < b) a fraction: those of recipes, measures and odds.
# Any other "a/b" that is a valid month/day is read as a date ("9/11", "12/25"), and a
# date word before it ("on 7/8") makes it a date whatever the denominator.
_FRACTION_DENOMINATORS = frozenset({2, 3, 4, 5, 6, 8, 10, 16, 32, 64, 100})
_DATE_CONTEXT = frozenset("on since by until till from before after due dated".split())
# Times: "10:30", "10:30am", "10:30 p.m.", "14:05", "10:30:15"; "7 pm", "7pm", "7 a.m.".
# The meridiem is read "eh em" / "pee em": spelled as sounds, so that no voice reads "AM"
# as the verb (a voice that lowercases first would) or "a.m." as a sentence end. Not
# "ay em": espeak-ng, the phonemizer of the Piper voices, says "ay" as "aye" ("eye em").
_MERIDIEM = r"(?:\s?([ap])(\.\s?m\.|m\b))"
_CLOCK = re.compile(rf"(?<![\d:.])([01]?\d|2[0-3]):([0-5]\d)(?::([0-5]\d))?(?![\d:]){_MERIDIEM}?",
                    re.IGNORECASE)
_HOUR_MERIDIEM = re.compile(rf"(?<![\d:.])(1[0-2]|0?[1-9]){_MERIDIEM}", re.IGNORECASE)
_MERIDIEM_WORDS = {"a": "eh em", "p": "pee em"}
# Slash dates: month/day/year by default (US order; the voices we ship are en_US), or
# day/month/year when the first number cannot be a month and the second can (25/12/2026).
_SLASH_DATE = re.compile(r"(?<![\d/])(\d{1,2})/(\d{1,2})/(\d{4}|\d{2})(?![\d/])")
# Phone numbers, read digit by digit in their groups: "555-1234", "555-123-4567",
# "(555) 123-4567", "555.123.4567", "+1 555 123 4567", "+44 20 7946 0958".
_PHONE = re.compile(
    r"(?<![\w+.-])(?:"
    r"\+\d{1,3}(?:[\s.-]\(?\d{1,4}\)?){2,5}"  # international: + country code, groups
    r"|\(\d{3}\)\s?\d{3}[.-]\d{4}"  # (555) 123-4567
    r"|[2-9]\d{2}([.-])\d{3}\1\d{4}"  # 555-123-4567, 555.123.4567
    # 555-1234: a local number starts with 2-9 (North American exchange codes), which
    # keeps ranges such as "100-2000" numbers.
    r"|[2-9]\d{2}-\d{4}"
    r")(?![\w-]|\.\d)"
)
_DIGIT_NAMES = "zero one two three four five six seven eight nine".split()


def _sentence_end(match: re.Match, group: int) -> str:
    """"." when the dotted meridiem in `group` ("a.m.") also ended its sentence: its
    last dot is then the full stop too ("at 6 a.m. Then..."), which the words replacing
    it must keep."""
    dotted = match.group(group).endswith(".")
    rest = match.string[match.end():]
    ends = not rest.strip() or bool(re.match(r"\s+[A-Z\"'(]", rest))
    return "." if dotted and ends else ""


def _is_date(month: int, day: int, year: int | None = None) -> bool:
    """Whether month/day (of `year`; a 2-digit year is 20xx; None: any year, so February
    29th is a date) is a day of the calendar: "2/30" and "4/31" are not."""
    if not 1 <= month <= 12 or day < 1:
        return False
    if year is not None and year < 100:
        year += 2000
    return day <= calendar.monthrange(year if year is not None else 2000, month)[1]


def _roman_value(numeral: str) -> int | None:
    """The value of a canonical Roman numeral of I, V and X (1..39), else None."""
    total = 0
    for index, ch in enumerate(numeral):
        value = _ROMAN_VALUES[ch]
        following = _ROMAN_VALUES[numeral[index + 1]] if index + 1 < len(numeral) else 0
        total += -value if value < following else value
    canonical = "X" * (total // 10) + ["", "I", "II", "III", "IV", "V", "VI", "VII", "VIII",
                                       "IX"][total % 10]
    return total if 0 < total < 40 and canonical == numeral else None


class Normaliser:
    """Numbers, currency, dates and symbols to words, in one language. Languages that
    num2words does not know keep their digits (espeak reads them); only English gets the
    rules that need English words (percent, fractions, years, dates, Roman numerals)."""

    def __init__(self, language: str):
        from num2words import CONVERTER_CLASSES

        base = language_base(language)
        self.language = base
        self._converter = CONVERTER_CLASSES.get(base)
        self.english = base == "en"

    def __call__(self, text: str) -> str:
        text = drop_symbols(text)
        if self._converter is None:
            return text
        if self.english:
            text = _PHONE.sub(self._phone, text)
            text = _ISO_DATE.sub(self._iso_date, text)
            text = _SLASH_DATE.sub(self._slash_date, text)
            text = _CLOCK.sub(self._clock, text)
            text = _HOUR_MERIDIEM.sub(self._hour_meridiem, text)
            text = _YEAR_RANGE.sub(self._year_range, text)
            text = _ROMAN.sub(self._roman, text)
            text = _DECADE.sub(self._decade, text)
            text = _YEAR_CONTEXT.sub(self._year, text)
            text = _PERCENT.sub(lambda m: f"{self._number(m.group(1))} percent", text)
            text = _FRACTION.sub(self._fraction, text)
            text = re.sub(r"\s&\s", " and ", text)
        text = _CURRENCY.sub(self._currency, text)
        text = _ORDINAL.sub(self._ordinal, text) if self.english else text
        text = _PLAIN_NUMBER.sub(self._plain, text)
        return _WHITESPACE_RUN.sub(" ", text).strip()

    def _number(self, digits: str) -> str:
        value = Decimal(digits.replace(",", ""))
        if value == value.to_integral_value() and "." not in digits:
            return self._converter.to_cardinal(int(value))
        return self._converter.to_cardinal(value)

    def _plain(self, match: re.Match) -> str:
        sign, digits = match.group(1) or "", match.group(2)
        if len(digits) >= _LONG_DIGITS and digits.isdigit():
            return " ".join(self._converter.to_cardinal(int(d)) for d in digits)
        try:
            return self._number(sign + digits)
        except (InvalidOperation, OverflowError, NotImplementedError, ValueError):
            return match.group()

    def _currency(self, match: re.Match) -> str:
        code = _CURRENCY_SYMBOLS[match.group(1)]
        amount = Decimal(match.group(2).replace(",", ""))
        scale = match.group(3)
        forms = getattr(self._converter, "CURRENCY_FORMS", {}).get(code)
        if forms is None and self.english:
            forms = (_EN_CURRENCY_NAMES[code],) if code in _EN_CURRENCY_NAMES else None
        if forms is None:
            return match.group()  # a currency this language's converter cannot name
        if scale:  # "$5 million": five million dollars
            return f"{self._number(match.group(2))} {scale} {forms[0][-1]}"
        if amount == amount.to_integral_value():
            whole = int(amount)
            name = self._converter.pluralize(whole, forms[0])
            return f"{self._converter.to_cardinal(whole)} {name}"
        try:
            return self._converter.to_currency(amount, currency=code)
        except NotImplementedError:
            return f"{self._number(match.group(2))} {forms[0][-1]}"

    def _ordinal(self, match: re.Match) -> str:
        return self._converter.to_ordinal(int(match.group(1)))

    def _year(self, match: re.Match) -> str:
        return f"{match.group(1)} {self._converter.to_year(int(match.group(2)))}"

    def _year_range(self, match: re.Match) -> str:
        first, last = (self._converter.to_year(int(g)) for g in match.groups())
        return f"{first} to {last}"

    def _decade(self, match: re.Match) -> str:
        year = self._converter.to_year(int(match.group(1) + match.group(2)))
        head, _, last = year.rpartition(" ")
        last = last[:-1] + "ies" if last.endswith("y") else last + "s"  # twenty -> twenties
        return f"{head} {last}".strip()

    def _iso_date(self, match: re.Match) -> str:
        year, month, day = (int(g) for g in match.groups())
        if not _is_date(month, day, year):
            return " ".join(match.groups())  # "2026-02-30": the numbers, read on
        return (f"{_MONTHS[month - 1]} {self._converter.to_ordinal(day)}, "
                f"{self._converter.to_year(year)}")

    def _phone(self, match: re.Match) -> str:
        groups = re.findall(r"\d+", match.group())
        said = ", ".join(" ".join(_DIGIT_NAMES[int(d)] for d in group) for group in groups)
        return ("plus " if match.group().startswith("+") else "") + said

    def _date_words(self, month: int, day: int, year: str | None) -> str:
        said = f"{_MONTHS[month - 1]} {self._converter.to_ordinal(day)}"
        if year is None:
            return said
        # A two-digit year is said as written ("'26": twenty-six).
        year_words = (self._converter.to_year(int(year)) if len(year) == 4
                      else self._converter.to_cardinal(int(year)))
        return f"{said}, {year_words}"

    def _slash_date(self, match: re.Match) -> str:
        first, second, year = int(match.group(1)), int(match.group(2)), match.group(3)
        if _is_date(first, second, int(year)):
            return self._date_words(first, second, year)
        if first > 12 and _is_date(second, first, int(year)):
            return self._date_words(second, first, year)
        # Not a day of the calendar ("02/30/2026", "4/31/2026"): the numbers, read on.
        return " ".join(match.group().split("/"))

    def _clock(self, match: re.Match) -> str:
        hour, minute, second = int(match.group(1)), int(match.group(2)), match.group(3)
        meridiem = match.group(4)
        said = self._converter.to_cardinal(hour)
        if minute:
            said += (" oh " if minute < 10 else " ") + self._converter.to_cardinal(minute)
        elif not meridiem:
            # 24-hour times on the hour ("14:00", "09:00") are "hundred"; 12-hour ones
            # "o'clock".
            said += " hundred" if hour > 12 or match.group(1).startswith("0") else " o'clock"
        if second is not None and int(second):
            count = int(second)
            said += f" and {self._converter.to_cardinal(count)} second{'s' * (count != 1)}"
        if meridiem:
            said += " " + _MERIDIEM_WORDS[meridiem.lower()] + _sentence_end(match, 5)
        return said

    def _hour_meridiem(self, match: re.Match) -> str:
        return (f"{self._converter.to_cardinal(int(match.group(1)))} "
                f"{_MERIDIEM_WORDS[match.group(2).lower()]}{_sentence_end(match, 3)}")

    def _roman(self, match: re.Match) -> str:
        word, numeral = match.group(1), match.group(2)
        value = _roman_value(numeral)
        cardinal_context = word.lower() in _ROMAN_CARDINAL_AFTER
        if value is None or (len(numeral) == 1 and not cardinal_context):
            return match.group()  # "Malcolm X", "I": letters, not numbers
        if cardinal_context:
            return f"{word} {self._converter.to_cardinal(value)}"
        return f"{word} the {self._converter.to_ordinal(value)}"

    def _fraction(self, match: re.Match) -> str:
        numerator, denominator = int(match.group(1)), int(match.group(2))
        before = match.string[: match.start()].split()
        date_context = bool(before) and before[-1].lower() in _DATE_CONTEXT
        is_fraction = 0 < numerator < denominator and denominator in _FRACTION_DENOMINATORS
        if (date_context or not is_fraction) and _is_date(numerator, denominator):
            return self._date_words(numerator, denominator, None)  # "9/11", "on 7/8"
        # Not a date: a fraction ("2/30": two thirtieths), also an improper one over a
        # denominator of measures ("13/4": thirteen quarters); else the two numbers.
        improper = numerator > denominator and denominator in _FRACTION_DENOMINATORS
        if not (0 < numerator < denominator or improper):
            return f"{match.group(1)} {match.group(2)}"  # "24/7", "50/50": read the numbers
        count = self._converter.to_cardinal(numerator)
        if denominator in _FRACTION_NAMES:
            name = _FRACTION_NAMES[denominator][numerator > 1]
        else:
            name = self._converter.to_ordinal(denominator) + ("s" if numerator > 1 else "")
        return f"{count} {name}"


# ---------------------------------------------------------------------------- the path


@dataclass(frozen=True)
class Sentence:
    """One piece to synthesize, and the silence after it ("" text: silence alone)."""

    text: str
    pause_s: float = 0.0


_WHITESPACE_RUN = re.compile(r"[^\S\n]+")


@dataclass(frozen=True)
class SpeechText:
    """A request's text after the checks that need no voice: SSML blocks, cleaned."""

    blocks: tuple[Block, ...]

    @classmethod
    def parse(cls, text: object, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS) -> SpeechText:
        if not isinstance(text, str):
            raise EngineInputError("text", f"must be a string, got {type(text).__name__}")
        # Checked on the raw input first so a megabyte of text is refused before any work.
        if len(text) > max_text_chars:
            raise EngineInputError(
                "text", f"is {len(text)} characters long; the limit is {max_text_chars}")
        blocks = tuple(Block(clean_text(b.text), b.pause_s) for b in parse_ssml(text))
        spoken = " ".join(b.text for b in blocks).strip()
        if not spoken and not any(b.pause_s for b in blocks):
            raise EngineInputError("text", "is empty")
        return cls(blocks)

    @property
    def text(self) -> str:
        """The words of every block (for the script check and routing)."""
        return "\n\n".join(b.text for b in self.blocks if b.text)

    def sentences(self, voice: str, languages: Sequence[str],
                  max_sentence_chars: int = DEFAULT_MAX_SENTENCE_CHARS,
                  warn: Callable[[str], None] | None = None) -> list[Sentence]:
        """What voice `voice` (reading `languages`; the first one is used for numbers)
        says: refuses text in scripts it cannot read, normalises, splits. Words left out
        (a few in a script the voice cannot read) are logged and told to `warn`, one
        message naming the script(s), the words and the voice."""
        check = check_scripts(self.text, languages)
        if check is not None and not check.speakable:
            raise EngineInputError("text", _script_refusal(check, voice, languages))
        if check is not None and check.foreign_runs:
            message = dropped_words_message(self.text, check, voice, languages)
            if message:
                log.info("%s", message)
                if warn is not None:
                    warn(message)
        normalise = Normaliser(languages[0]) if languages else None
        sentences: list[Sentence] = []
        for block in self.blocks:
            text = block.text
            if check is not None and check.foreign_runs:
                text = _drop_foreign(text, languages)
            if normalise is not None:
                text = normalise(text)
            pieces = [p for p in split_sentences(text, max_sentence_chars)
                      if any(ch.isalnum() for ch in p)]
            sentences.extend(Sentence(p) for p in pieces)
            if block.pause_s:
                # The silence follows the last sentence said (a leading one stands alone).
                if sentences:
                    last = sentences[-1]
                    sentences[-1] = Sentence(last.text, last.pause_s + block.pause_s)
                else:
                    sentences.append(Sentence("", block.pause_s))
        if not any(s.text for s in sentences):
            raise EngineInputError("text", "has nothing speakable (no letter or digit)")
        return sentences


def _script_refusal(check: ScriptCheck, voice: str, languages: Sequence[str]) -> str:
    scripts = ", ".join(f"{script} ({words} of {check.words} words)"
                        for script, words in check.foreign.most_common())
    scripts = scripts.replace(", ", " and ", 1) if len(check.foreign) == 2 else scripts
    hint = languages_for_scripts(check.foreign)
    route = (f"; set the TTS engine's voices_by_language for {'/'.join(hint[:4])}, or pick "
             "a voice for it" if hint else "")
    plural = "s" * (len(check.foreign) > 1)
    return (f"is written in the {scripts} script{plural}, which voice {voice!r} cannot speak "
            f"(it speaks {', '.join(languages)}){route}")


MAX_WORDS_NAMED = 5  # a warning quotes at most this many of the words left out


def dropped_words_message(text: str, check: ScriptCheck, voice: str,
                          languages: Sequence[str]) -> str:
    """The warning for the runs of `check` that `_drop_foreign` leaves out of `text`
    (not Latin ones, which every voice reads): how many words, in which script(s), the
    first few of them, and the voice's name and languages. "" when none is left out."""
    dropped = [run for run in check.foreign_runs if run.script != "Latin"]
    if not dropped:
        return ""
    # Words as the script check counts them: touching runs ("寿司を") are one word, so the
    # count and the words quoted agree.
    words: list[list[ScriptRun]] = []
    for run in dropped:
        if words and words[-1][-1].end == run.start and not run.words:
            words[-1].append(run)
        else:
            words.append([run])
    scripts: Counter = Counter(word[0].script for word in words)
    count = len(words)
    named = ", ".join(f"{script} ({n})" for script, n in scripts.most_common())
    quoted = ", ".join(repr(text[word[0].start:word[-1].end]) for word in words[:MAX_WORDS_NAMED])
    more = f" and {count - MAX_WORDS_NAMED} more" if count > MAX_WORDS_NAMED else ""
    return (f"left out {count} word{'s' * (count != 1)} in the {named} script"
            f"{'s' * (len(scripts) > 1)} ({quoted}{more}), which voice {voice!r} cannot "
            f"read (it speaks {', '.join(languages)}); the rest is spoken")


def _drop_foreign(text: str, languages: Sequence[str]) -> str:
    """`text` without its runs of letters in scripts `languages` do not use. Latin stays:
    every espeak voice reads it (brand names, code words); other scripts would be spelled
    out as "Chinese letter", "Arabic letter"."""
    readable = frozenset().union(*(language_scripts(c) or frozenset() for c in languages))
    pieces, position = [], 0
    for run in script_runs(text):
        if run.script in readable or run.script == "Latin":
            continue
        pieces.append(text[position : run.start])
        pieces.append(" ")
        position = run.end
    pieces.append(text[position:])
    return _WHITESPACE_RUN.sub(" ", "".join(pieces)).strip()


def speak_sentences(sentences: Sequence[Sentence], synthesize: Callable[[str], np.ndarray],
                    sample_rate: int) -> Iterator[np.ndarray]:
    """PCM chunks of `sentences`: one per sentence, its pause appended as silence (a pause
    alone is a chunk of silence)."""
    for sentence in sentences:
        audio = synthesize(sentence.text) if sentence.text else np.zeros(0, np.float32)
        if sentence.pause_s:
            silence = np.zeros(round(sentence.pause_s * sample_rate), np.float32)
            audio = np.concatenate([audio.astype(np.float32, copy=False), silence])
        if audio.size:
            yield audio
