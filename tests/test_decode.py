"""Decoding of register words: point types, not-implemented encodings, scale factors."""

from __future__ import annotations

import math
import struct

import pytest

from edge_agent.decode import (
    PointDecoder,
    decode_model,
    decode_profile_register,
    decode_raw,
    decode_string,
    normalise_power_factor,
    scale,
)
from edge_agent.sunspec import ModelLayout, PointLayout, layout_model


def float32_words(value: float) -> list[int]:
    (raw,) = struct.unpack(">I", struct.pack(">f", value))
    return [raw >> 16, raw & 0xFFFF]


@pytest.mark.parametrize(
    ("point_type", "words"),
    [
        ("int16", [0x8000]),
        ("uint16", [0xFFFF]),
        ("count", [0xFFFF]),
        ("enum16", [0xFFFF]),
        ("bitfield16", [0xFFFF]),
        ("acc16", [0]),
        ("sunssf", [0x8000]),
        ("int32", [0x8000, 0]),
        ("uint32", [0xFFFF, 0xFFFF]),
        ("enum32", [0xFFFF, 0xFFFF]),
        ("bitfield32", [0xFFFF, 0xFFFF]),
        ("acc32", [0, 0]),
        ("ipaddr", [0, 0]),
        ("int64", [0x8000, 0, 0, 0]),
        ("uint64", [0xFFFF] * 4),
        ("acc64", [0] * 4),
        ("float32", [0x7FC0, 0]),
        ("float32", float32_words(math.inf)),
        ("float32", float32_words(-math.inf)),
        ("float64", [0x7FF8, 0, 0, 0]),
        ("string", [0, 0]),
        ("pad", [0x5A5A]),
    ],
)
def test_not_implemented_is_none(point_type, words):
    assert decode_raw(point_type, words) is None


@pytest.mark.parametrize(
    ("point_type", "words", "expected"),
    [
        ("int16", [0xFFFE], -2),
        ("int16", [0x7FFF], 32767),
        ("sunssf", [0xFFFE], -2),
        ("sunssf", [0x0003], 3),
        ("uint16", [0xFFFE], 65534),
        ("int32", [0xFFFF, 0xFFFE], -2),
        ("uint32", [0x047F, 0x1FE4], 75440100),
        ("acc32", [0, 4], 4),
        ("int64", [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF], -1),
        ("uint64", [0, 0, 0x0002, 0x49F0], 150000),
        ("enum16", [7], 7),
        ("bitfield32", [0, 1], 1),
        ("float32", [0x4367, 0xAF55], 231.68489),
        ("ipaddr", [0xC0A8, 0x0114], "192.168.1.20"),
        ("string", [0x5345, 0x3130, 0x4B00, 0x4142], "SE10K"),
    ],
)
def test_decode_raw_values(point_type, words, expected):
    assert decode_raw(point_type, words) == expected


def test_string_control_and_high_bytes():
    words = [0x4C47, 0x0118, 0x0239, 0x3900, 0x4142]
    assert decode_string(words) == "LG\x01\x18\x0299"
    assert decode_string([0x5072, 0x696D, 0x65C2, 0x2031]) == "Prime\ufffd 1"
    assert decode_string([0x2041, 0x4220, 0x2020]) == "AB"


@pytest.mark.parametrize(
    ("raw", "exponent", "expected"),
    [(302, -1, 30.2), (5002, -2, 50.02), (75438, 3, 75438000.0), (-9846, -2, -98.46),
     (61079, -4, 6.1079), (0, 0, 0.0), (892737225, -2, 8927372.25)],
)
def test_scale_exact(raw, exponent, expected):
    assert scale(raw, exponent) == expected


def small_layout() -> ModelLayout:
    return ModelLayout(
        model_id=64999,
        length=5,
        points=(
            PointLayout("ID", 0, "uint16", 1),
            PointLayout("L", 1, "uint16", 1),
            PointLayout("A", 2, "uint16", 1, "A", "A_SF"),
            PointLayout("A_SF", 3, "sunssf", 1),
            PointLayout("W", 4, "int16", 1, "W", "W_SF"),
            PointLayout("W_SF", 5, "sunssf", 1),
            PointLayout("Tmp", 6, "int16", 1, "C", -1),
        ),
    )


def test_model_scales_with_same_words():
    values = decode_model(small_layout(), [64999, 5, 302, 0xFFFF, 0xFF00, 2, 215])
    assert values["A"] == 30.2
    assert values["W"] == -25600.0
    assert values["Tmp"] == 21.5


def test_model_sf_not_implemented():
    values = decode_model(small_layout(), [64999, 5, 302, 0x8000, 100, 0, 215])
    assert values["A"] is None
    assert values["W"] == 100.0


def test_model_missing_words_are_none():
    values = decode_model(small_layout(), [64999, 5, 302, None, 100, 0, None])
    assert values["A"] is None
    assert values["W"] == 100.0
    assert values["Tmp"] is None


def test_model_short_words_are_none():
    values = decode_model(small_layout(), [64999, 5, 302, 0xFFFF])
    assert values["A"] == 30.2
    assert values["W"] is None


@pytest.mark.parametrize(
    ("integer", "floating"),
    [(101, 111), (102, 112), (103, 113), (201, 211), (202, 212), (203, 213), (204, 214)],
)
def test_float_family_same_points(integer, floating):
    integer_layout = layout_model(integer, 1000)
    float_layout = layout_model(floating, 1000)
    integer_names = {p.name for p in integer_layout.points if p.type != "sunssf"}
    float_names = {p.name for p in float_layout.points if p.type != "sunssf"}
    assert float_names == integer_names


@pytest.mark.parametrize(
    ("words", "expected"),
    [([0x3FA1, 0x47AE], 1.26), ([0x43CA, 0x999A], 405.2), ([0x4398, 0x3AE1], 304.46),
     ([0x4C18, 0xD22D], 40061108.0), ([0x3F80, 0x0001], 1.0000001),
     ([0x0000, 0x0001], 1e-45), ([0x7F7F, 0xFFFF], 3.4028235e38),
     ([0xC247, 0xE148], -49.97), ([0x8000, 0x0000], -0.0)],
)
def test_float32_shortest_decimal(words, expected):
    value = decode_raw("float32", words)
    assert repr(value) == repr(expected)


def test_float_model_shortest_decimals():
    words = [113, 60, 0x3FA1, 0x47AE, 0x3ED7, 0x0A3D] + [0] * 58
    words[10:12] = [0x43CA, 0x999A]
    values = decode_model(layout_model(113, 60), words)
    assert values["A"] == 1.26
    assert values["AphA"] == 0.42
    assert values["PPVphAB"] == 405.2


def test_float_model_decodes_nan_to_none():
    layout = layout_model(113, 60)
    words = [113, 60] + [0] * 60
    w_offset = layout.point("W").offset
    words[w_offset : w_offset + 2] = float32_words(297.0)
    dca_offset = layout.point("DCA").offset
    words[dca_offset : dca_offset + 2] = [0x7FC0, 0]
    values = decode_model(layout, words)
    assert values["W"] == 297.0
    assert values["DCA"] is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1.0, 1.0), (-0.95, -0.95), (100.0, 1.0), (-98.46, -0.9846), (98.5, 0.985),
     (None, None), (327.67, None)],
)
def test_power_factor_normalised(value, expected):
    assert normalise_power_factor(value) == expected


def test_profile_float_little_word_order():
    assert decode_profile_register([0x0000, 0x3F80], "float32", word_order="little") == 1.0
    assert decode_profile_register([0x0000, 0x3F80], "float32") == pytest.approx(2.28e-41,
                                                                                   rel=1e-2)


def test_profile_values():
    assert decode_profile_register([0x0064], "uint16", word_order="little") == 100
    assert decode_profile_register([0xFFFE], "int16") == -2
    assert decode_profile_register([0x7FC0, 0], "float32") is None
    nan = [0xFFFF_FFFF]
    assert decode_profile_register([0xFFFF, 0xFFFF], "uint32", no_value=nan) is None


@pytest.mark.parametrize("word", [0x8001, 0x000B, 0x7FFF, 0xFFF5])
def test_model_sf_out_of_range_is_none(word):
    values = decode_model(small_layout(), [64999, 5, 302, word, 100, 0, 215])
    assert values["A"] is None
    assert values["W"] == 100.0


@pytest.mark.parametrize("word, expected", [(0x000A, 3.02e12), (0xFFF6, 3.02e-08)])
def test_model_sf_range_ends_scale(word, expected):
    values = decode_model(small_layout(), [64999, 5, 302, word, 100, 0, 215])
    assert values["A"] == expected


def test_float64_scaled_past_range_is_none():
    layout = ModelLayout(
        model_id=64999,
        length=5,
        points=(
            PointLayout("ID", 0, "uint16", 1),
            PointLayout("L", 1, "uint16", 1),
            PointLayout("W", 2, "float64", 4, "W", "W_SF"),
            PointLayout("W_SF", 6, "sunssf", 1),
        ),
    )
    big = struct.unpack(">4H", struct.pack(">d", 1.7e308))
    values = decode_model(layout, [64999, 5, *big, 10])
    assert values["W"] is None


def mixed_layout() -> ModelLayout:
    return ModelLayout(
        model_id=64999,
        length=16,
        points=(
            PointLayout("ID", 0, "uint16", 1),
            PointLayout("L", 1, "uint16", 1),
            PointLayout("A", 2, "uint16", 1, "A", "SF"),
            PointLayout("SF", 3, "sunssf", 1),
            PointLayout("Tmp", 4, "int16", 1, "C", -1),
            PointLayout("W", 5, "int32", 2, "W", "SF"),
            PointLayout("Wh", 7, "acc64", 4, "Wh", "SF"),
            PointLayout("Hz", 11, "float32", 2, "Hz", "SF"),
            PointLayout("V", 13, "uint16", 1, "V", "Gone_SF"),
            PointLayout("Evt", 14, "bitfield32", 2),
            PointLayout("Md", 16, "string", 2),
        ),
    )


MIXED_NAMES = ["A", "Tmp", "W", "Wh", "Hz", "V", "Evt", "Md", "SF", "Absent"]


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ([64999, 16, 302, 0xFFFF, 215, 0xFFFF, 0xFFFE, 0, 0, 0, 1000,
          0x4366, 0xF852, 5, 0, 4, 0x4142, 0x4300],
         [30.2, 21.5, -0.2, 100.0, 23.097, None, 4, "ABC", -1, None]),
        ([64999, 16, 0xFFFF, 0x8000, 0x8000, 0x8000, 0, 0, 0, 0, 0,
          0x7FC0, 0, 0xFFFF, 0xFFFF, 0xFFFF, 0, 0],
         [None, None, None, None, None, None, None, None, None, None]),
        ([64999, 16, 302, 2, None, 0, 7, 0, 0, 0, None],
         [30200.0, None, 700.0, None, None, None, None, None, 2, None]),
    ],
)
def test_point_decoder_matches_model(words, expected):
    decoded = decode_model(mixed_layout(), words)
    values = PointDecoder(mixed_layout(), MIXED_NAMES).decode(words)
    assert values == expected
    assert values == [decoded.get(name) for name in MIXED_NAMES]
    assert list(map(type, values)) == [type(decoded.get(name)) for name in MIXED_NAMES]
