"""Streaming text: incremental detokenising and stop sequences (shared by every engine)."""

from __future__ import annotations

from hostgpu.inference.engines.base import IncrementalDecoder, StopMatcher


def utf8_bytes(ids: list[int]) -> str:
    # A byte-level "tokenizer": each id is one byte, as in byte-level BPE's worst case.
    return bytes(ids).decode("utf-8", errors="replace")


def test_multibyte_characters_are_never_split() -> None:
    decoder = IncrementalDecoder(utf8_bytes)
    text = "Zürich — 東京 🚀"
    out = [decoder.push(b) for b in text.encode()]
    assert "".join(out) + decoder.flush() == text
    assert all("\ufffd" not in piece for piece in out)


def test_an_incomplete_character_at_the_end_is_flushed() -> None:
    decoder = IncrementalDecoder(utf8_bytes)
    assert decoder.push(0xE6) == ""
    assert decoder.flush() == "\ufffd"


def test_stop_sequence_text_is_held_then_cut() -> None:
    matcher = StopMatcher(["\n\nUser:"])
    pieces = ["Hello", " there\n", "\nUs", "er: more"]
    emitted, stopped = [], False
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        emitted.append(text)
        if stopped:
            break
    assert stopped
    assert "".join(emitted) == "Hello there"


def test_held_text_is_released_when_it_does_not_become_a_stop() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.feed("the EN") == ("the ", False)
    assert matcher.feed("D") == ("", True)
    matcher = StopMatcher(["END"])
    matcher.feed("the EN")
    assert matcher.feed("VOY") == ("ENVOY", False)
    assert matcher.flush() == ""


def test_earliest_of_several_stops_wins() -> None:
    matcher = StopMatcher(["b", "a"])
    assert matcher.feed("xxab") == ("xx", True)
