"""Model layouts, discovery of the model chain, and read planning."""

from __future__ import annotations

import pytest

from edge_agent.endpoint import EndpointSettings
from edge_agent.sunspec import (
    MalformedMap,
    ModelRef,
    NoDevice,
    NotSunSpec,
    Read,
    cut_addresses,
    discover,
    layout_model,
    plan_reads,
    read_registers,
    usable_serial,
)
from edge_agent.transport import ModbusTimeout
from fake_endpoint import FakeEndpoint, FakeUnit, load_case

SUNS = [0x5375, 0x6E53]
END = [0xFFFF, 0]


def common_model(length: int = 66, serial: str = "SN1") -> list[int]:
    body = [0] * length
    body[0] = 0x4142  # "AB"
    serial_words = serial.encode().ljust(32, b"\0")
    body[48:64] = [int.from_bytes(serial_words[i : i + 2], "big") for i in range(0, 32, 2)]
    return [1, length, *body]


def image(*words: int, base: int = 40000) -> FakeEndpoint:
    return FakeEndpoint({1: FakeUnit(holding=dict(enumerate(words, base)))})


def model(model_id: int, length: int, fill: int = 0) -> list[int]:
    return [model_id, length, *([fill] * length)]


class TestLayout:
    def test_module_count_from_length(self):
        layout = layout_model(160, 8 + 12 * 20)
        names = [p.name for p in layout.points]
        assert "module[12].DCWH" in names
        assert "module[13].ID" not in names
        assert layout.point("module[12].DCWH").offset == 10 + 11 * 20 + 12

    def test_group_scale_factor_from_parent(self):
        layout = layout_model(160, 48)
        assert layout.point("module[2].DCW").sf == "DCW_SF"
        assert layout.point("module[2].DCW").units == "W"

    def test_count_point_group_from_length(self):
        layout = layout_model(714, 93)
        assert layout.point("Prt[3].DCW").offset == 70 + 12
        assert layout.point("Prt[3].DCW").sf == "DCW_SF"
        assert layout.point("Prt[4].DCW") is None

    def test_common_model_without_pad(self):
        assert layout_model(1, 65).point("Pad") is None
        assert layout_model(1, 66).point("Pad").offset == 67

    def test_nested_counts_from_words(self):
        fixed = layout_model(705, 64)
        assert all("[" not in p.name for p in fixed.points)
        words = [705, 64] + [0] * 64
        words[fixed.point("NCrv").offset] = 1
        words[fixed.point("NPt").offset] = 2
        layout = layout_model(705, 64, words)
        assert layout.point("Crv[1].Pt[2].Var") is not None
        assert layout.point("Crv[1].Pt[3].Var") is None

    def test_unknown_model(self):
        assert layout_model(64870, 20) is None

    def test_layout_cached(self):
        assert layout_model(103, 50) is layout_model(103, 50)


class TestDiscover:
    async def test_base_zero(self):
        endpoint = FakeEndpoint.from_case(load_case("C01b"))
        found = await discover(endpoint, 247)
        assert found.base == 0
        assert [m.model_id for m in found.models] == [1, 103, 160]
        assert found.devices[0].at == 2

    async def test_zeros_not_sunspec(self):
        endpoint = FakeEndpoint.from_case(load_case("C01a"))
        with pytest.raises(NotSunSpec, match="unit 3: no SunS marker at 40000, 0, 50000"):
            await discover(endpoint, 3)

    async def test_exception_11_no_device(self):
        endpoint = FakeEndpoint.from_case(load_case("C06"))
        with pytest.raises(NoDevice, match="unit 2: the gateway returned exception 11"):
            await discover(endpoint, 2)
        assert endpoint.requests == [(2, 40000, 2)]

    async def test_silent_unit_times_out(self):
        endpoint = FakeEndpoint.from_case(load_case("C06"), absent_units="timeout")
        with pytest.raises(ModbusTimeout):
            await discover(endpoint, 2)

    async def test_common_model_65(self):
        found = await discover(FakeEndpoint.from_case(load_case("C03")), 1)
        assert found.models[1] == ModelRef(103, 40069, 50)

    async def test_end_at_id_zero(self):
        found = await discover(FakeEndpoint.from_case(load_case("C04a")), 71)
        assert [m.model_id for m in found.models] == [1, 103, 113, 120, 123, 160, 203, 802]
        assert found.problems == ()

    async def test_end_at_exception_2(self):
        found = await discover(FakeEndpoint.from_case(load_case("C04b")), 126)
        assert [m.model_id for m in found.models][-2:] == [64870, 160]

    async def test_fragile_header(self):
        endpoint = FakeEndpoint.from_case(load_case("C05"))
        found = await discover(endpoint, 126)
        assert ModelRef(714, 41161, 93) in found.models
        assert found.fragile == ((41161, 41162),)
        assert (126, 41161, 1) in endpoint.requests

    async def test_identity(self):
        found = await discover(FakeEndpoint.from_case(load_case("C20")), 1)
        identity = found.devices[0].identity
        assert identity.manufacturer == "LG\x01\x18\x029999999999"
        assert identity.model == "Prime\ufffd 10H"
        assert identity.serial is None

    async def test_two_common_models(self):
        words = [*SUNS, *common_model(66, "INV1"), *model(103, 50),
                 *common_model(65, "MTR1"), *model(203, 105), *END]
        found = await discover(image(*words), 1)
        assert [d.at for d in found.devices] == [40002, 40122]
        assert [m.model_id for m in found.devices[1].models] == [1, 203]
        assert found.devices[1].identity.serial == "MTR1"

    async def test_vendor_model_skipped(self):
        words = [*SUNS, *common_model(), *model(64999, 3, 0x8000), *model(103, 50), *END]
        found = await discover(image(*words), 1)
        assert [m.model_id for m in found.models] == [1, 64999, 103]

    async def test_absurd_length_ends_chain(self):
        words = [*SUNS, *common_model(), *model(103, 50), 120, 0xF000]
        found = await discover(image(*words), 1)
        assert [m.model_id for m in found.models] == [1, 103]
        assert "model 120 declares L=61440" in found.problems[0]

    async def test_first_model_not_common(self):
        with pytest.raises(MalformedMap, match="the first model is 103"):
            await discover(image(*SUNS, *model(103, 50), *END), 1)

    async def test_bad_common_length(self):
        with pytest.raises(MalformedMap, match="common model length is 10"):
            await discover(image(*SUNS, *model(1, 10), *END), 1)

    async def test_nothing_after_marker(self):
        with pytest.raises(MalformedMap, match="at 40000 is malformed at register 40002"):
            await discover(image(*SUNS), 1)


class TestPlan:
    def test_adjacent_models_merged(self):
        models = [ModelRef(1, 40002, 66), ModelRef(103, 40070, 50)]
        assert plan_reads(models, 125) == [Read(40002, 120)]

    def test_unknown_model_skipped(self):
        models = [ModelRef(1, 40002, 66), ModelRef(64999, 40070, 3),
                  ModelRef(103, 40075, 50)]
        assert plan_reads(models, 125) == [Read(40002, 68), Read(40075, 52)]

    def test_split_on_point_boundaries(self):
        model_160 = ModelRef(160, 41106, 248)
        reads = plan_reads([model_160], 50)
        cuts = cut_addresses([model_160])
        assert all(r.count <= 50 for r in reads)
        assert all(r.address in cuts for r in reads)
        assert reads[0].address == 41106
        assert reads[-1].address + reads[-1].count == model_160.end
        starts = [r.address for r in reads]
        # DCWH of module 1 (acc32) starts at 41129: no read may start at 41130.
        assert 41130 not in starts

    def test_fragile_read_singly(self):
        models = [ModelRef(715, 41100, 59), ModelRef(714, 41161, 93)]
        reads = plan_reads(models, 125, [(41161, 41162)])
        assert Read(41161, 1) in reads
        assert Read(41162, 1) in reads
        assert all(not (r.address < 41161 < r.address + r.count) for r in reads
                   if r.count > 1)


class TestReadRegisters:
    async def test_rejected_read_bisected(self):
        endpoint = FakeEndpoint.from_case(load_case("C05"))
        models = [ModelRef(714, 41161, 93)]
        registers, done = await read_registers(
            endpoint, 126, [Read(41161, 95)], cut_addresses(models)
        )
        assert registers[41161] == 714
        assert registers[41162] == 93
        assert len(registers) == 95
        assert Read(41161, 1) in done
        assert all(r.count == 1 for r in done if r.address <= 41162)

    async def test_device_limit_respected(self):
        case = load_case("C10")
        endpoint = FakeEndpoint.from_case(
            case, settings=EndpointSettings(host="127.0.0.1", max_registers=50)
        )
        found = await discover(endpoint, 1)
        reads = plan_reads(found.models, 50, found.fragile)
        registers, done = await read_registers(endpoint, 1, reads,
                                               cut_addresses(found.models))
        assert done == reads
        assert registers[41106] == 160


@pytest.mark.parametrize(
    ("serial", "expected"),
    [("3099000101", "3099000101"), ("", None), (None, None), ("ZZ\ufffd1", None),
     ("AB\x01C", None), ("SN 42", "SN 42")],
)
def test_usable_serial(serial, expected):
    assert usable_serial(serial) == expected
