"""Loading device images: raw register images and pysunspec2 device JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent.errors import AgentError
from edge_agent.images import (
    DeviceImage,
    ExceptionRange,
    ImageError,
    LinkBehaviour,
    RegisterBlock,
    SiteImage,
    Step,
    load_image,
    load_images,
    merge_images,
)
from sim_fixtures import CASES, DEVICE_1547, load_case


def write_image(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "image.json"
    path.write_text(json.dumps(document))
    return path


def minimal_image(**device: object) -> dict:
    return {
        "format": 1,
        "devices": [
            {"unit": 1, "holding": [{"address": 0, "words": "0001"}], **device}
        ],
    }


class TestRegisterImage:
    def test_case_units_and_words(self):
        image = load_case("C06")

        assert image.name == "C06"
        assert image.units == (1, 240)
        assert image.device(1).read("holding", 40000, 4) == [0x5375, 0x6E53, 1, 0x41]
        assert image.device(240).holding[0].address == 40000

    def test_case_link_behaviour(self):
        assert load_case("C09").link == LinkBehaviour(
            ignore_requests_within_ms_of_connect=1000, min_gap_ms=50
        )
        assert load_case("C10").link.max_registers_per_read == 50
        assert load_case("C08").link.max_clients == 1
        assert load_case("C03").link == LinkBehaviour()

    def test_case_exception_range(self):
        device = load_case("C05").device(126)

        assert device.exceptions == (ExceptionRange(41161, 41162, 2, 2),)
        assert device.exception_for(41161, 2) == 2
        assert device.exception_for(41160, 3) == 2
        assert device.exception_for(41161, 1) is None
        assert device.exception_for(41163, 3) is None

    def test_case_input_registers(self):
        device = load_case("C01a").device(3)

        assert device.read("input", 30775, 2) == [0x0000, 0x0992]
        assert device.is_mapped("input", 30775, 2)
        assert not device.is_mapped("input", 30775, 3)
        assert not device.is_mapped("holding", 30775, 1)

    def test_case_steps_patch_registers(self):
        image = load_case("C13")
        device = image.device(1)

        assert len(image.steps) == 2
        assert image.steps[1].holding[0] == RegisterBlock(40083, (0x0415,))
        assert image.at_step(0).device(1) == device
        patched = image.at_step(1).device(1)
        assert patched.read("holding", 40083, 1) == [0x0415]
        assert patched.read("holding", 40272, 3) == [0x00A0, 0xA122, 0x19C8]
        assert patched.read("holding", 40000, 80) == device.read("holding", 40000, 80)

    def test_every_case_loads(self):
        for path in sorted(CASES.glob("*.json")):
            image = load_image(path)
            assert image.name == path.stem
            assert image.devices

    def test_unit_replaces_single_device(self):
        image = load_image(CASES / "C13.json", unit=7)

        assert image.units == (7,)
        assert {step.unit for step in image.steps} == {7}

    def test_unit_with_several_devices(self):
        with pytest.raises(ImageError, match="has 2 devices"):
            load_image(CASES / "C06.json", unit=7)

    def test_silent_step(self, tmp_path):
        document = minimal_image()
        document["steps"] = [{"holding": [], "silent": True}]

        image = load_image(write_image(tmp_path, document))

        assert image.steps == (Step(unit=1, silent=True),)


class TestSunSpecDevice:
    def test_layout_markers(self):
        device = load_image(DEVICE_1547).device(1)

        assert device.read("holding", 40000, 2) == [0x5375, 0x6E53]  # "SunS"
        assert device.read("holding", 40002, 2) == [1, 66]
        assert device.read("holding", 40070, 2) == [701, 153]
        block = device.holding[0]
        assert block.address == 40000
        assert block.words[-2:] == (0xFFFF, 0x0000)

    def test_model_701_points(self):
        device = load_image(DEVICE_1547).device(1)
        body = 40070  # ID register of model 701

        assert device.read("holding", body + 10, 1) == [9800]  # W, W_SF at +116
        assert device.read("holding", body + 116, 1) == [0]  # W_SF 0: 9800 W
        assert device.read("holding", body + 17, 2) == [0, 60010]  # Hz uint32
        assert device.read("holding", body + 115, 1) == [0xFFFD]  # Hz_SF -3: 60.010 Hz
        assert device.read("holding", body + 19, 4) == [0, 0, 0, 150]  # TotWhInj
        assert device.read("holding", body + 120, 1) == [3]  # TotWh_SF 3: 150000 Wh
        assert device.read("holding", body + 93, 1) == [0xFFFF]  # VL3 not given

    def test_common_model_strings(self):
        device = load_image(DEVICE_1547).device(1)

        manufacturer = device.read("holding", 40004, 16)
        text = b"".join(word.to_bytes(2, "big") for word in manufacturer)
        assert text.rstrip(b"\0") == b"SunSpecTest"

    def test_model_chain_lengths(self):
        words = load_image(DEVICE_1547).device(1).holding[0].words
        address, models = 2, []
        while words[address] != 0xFFFF:
            models.append(words[address])
            address += 2 + words[address + 1]

        assert models == [1, *range(701, 714)]
        assert address == len(words) - 2

    def test_unit(self):
        assert load_image(DEVICE_1547, unit=126).units == (126,)
        assert load_image(DEVICE_1547).units == (1,)

    def test_unknown_model(self, tmp_path):
        path = write_image(tmp_path, {"name": "x", "models": [{"ID": 64999}]})

        message = "model 64999 has no pysunspec2 definition"
        with pytest.raises(ImageError, match=message):
            load_image(path)


class TestImageErrors:
    @pytest.mark.parametrize(
        ("document", "message"),
        [
            ([1], "expected a JSON object"),
            ({"format": 2, "devices": []}, "format 2 is not supported"),
            ({"format": 1, "devices": []}, "lists no device"),
            ({"hello": 1}, "unknown image format"),
            (minimal_image(unit=0), r"devices\[0\].unit: 0 is out of range"),
            (
                minimal_image(holding=[{"address": 0, "words": "12345"}]),
                r"'12345' is not a 16-bit hex word",
            ),
            (
                minimal_image(
                    holding=[
                        {"address": 0, "words": "0001 0002"},
                        {"address": 1, "words": "0003"},
                    ]
                ),
                "blocks at 0 and 1 overlap",
            ),
            (minimal_image(unmapped="ignore"), r"unmapped: 'ignore' is invalid"),
            (
                minimal_image(exceptions=[{"first": 0, "last": 1, "code": 9}]),
                "9 is not a Modbus exception code",
            ),
            (
                {**minimal_image(), "link": {"max_registers_per_read": 200}},
                "max_registers_per_read: 200 is out of range",
            ),
            ({**minimal_image(), "link": {"speed": 1}}, r"link.speed: unknown setting"),
            (
                {
                    **minimal_image(),
                    "steps": [{"holding": [{"address": 5, "words": "1"}]}],
                },
                r"steps\[0\].holding: address 5 count 1 patches registers",
            ),
            (
                {**minimal_image(), "steps": [{"unit": 2}]},
                r"steps\[0\].unit: no device has unit id 2",
            ),
        ],
    )
    def test_invalid_document(self, tmp_path, document, message):
        path = write_image(tmp_path, document)

        with pytest.raises(ImageError, match=message) as caught:
            load_image(path)
        assert str(caught.value).startswith(f"{path}: ")
        assert "\n" not in str(caught.value)

    def test_missing_file(self, tmp_path):
        with pytest.raises(ImageError, match="cannot read image file"):
            load_image(tmp_path / "none.json")

    def test_not_json(self, tmp_path):
        path = tmp_path / "bad.json"
        path.write_text("{")

        with pytest.raises(ImageError, match="not valid JSON"):
            load_image(path)

    def test_is_agent_error(self):
        assert issubclass(ImageError, AgentError)


class TestMergeImages:
    def test_keeps_units(self):
        merged = merge_images([load_case("C03"), load_image(DEVICE_1547, unit=2)])

        assert merged.units == (1, 2)
        assert merged.name == "C03+device_1547"

    def test_unit_clash(self):
        with pytest.raises(ImageError, match="unit id 1 is used by both C03 and C11a"):
            merge_images([load_case("C03"), load_case("C11a")])

    def test_different_links(self):
        with pytest.raises(ImageError, match="set different link behaviour"):
            merge_images([load_case("C10"), load_image(DEVICE_1547, unit=2)])

    def test_steps_kept(self):
        other = SiteImage("other", (DeviceImage(unit=9),))

        merged = merge_images([other, load_case("C13")])

        assert merged.steps == load_case("C13").steps


def test_load_images_numbers_sunspec_devices():
    images = load_images([DEVICE_1547, CASES / "C01a.json", DEVICE_1547])

    assert [image.units for image in images] == [(1,), (126, 3), (2,)]
