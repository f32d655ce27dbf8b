"""Device profiles: loading, problems with their lines, decoding, planning, quirks,
the config's profile keys, and the pollers that apply them over real sockets."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path

import pytest

from edge_agent.config import check_config, load_config
from edge_agent.endpoint import EndpointSettings
from edge_agent.poller import (
    ProfilePoller,
    UnitPoller,
    run_endpoint,
    skip_reads,
    tighten,
)
from edge_agent.profiles import (
    Limits,
    ProfileError,
    ProfileRead,
    Register,
    builtin_profiles,
    load_profiles,
)
from edge_agent.readings import Channel, DeviceState, Poll
from edge_agent.sunspec import Read
from edge_agent.transport import ModbusEndpoint
from sim_fixtures import serve_image  # noqa: F401

METER = """\
[device]
manufacturer = "Acme"
model = "M3"
function_code = 4

[[registers]]
name = "V"
address = 0
type = "float32"
unit = "V"

[[registers]]
name = "E"
address = 10
type = "uint32"
word_order = "little"
scale_exponent = -1
unit = "kWh"
no_value = ["FFFFFFFF"]
"""


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


def problems(folder: Path) -> list[str]:
    with pytest.raises(ProfileError) as raised:
        load_profiles(folder)
    return str(raised.value).splitlines()


class TestBuiltinProfiles:
    def test_register_maps(self):
        profiles = builtin_profiles()
        assert sorted(profiles.register_maps) == ["eastron-sdm630",
                                                  "solaredge-power-control"]
        meter = profiles.register_map("eastron-sdm630")
        assert meter.manufacturer == "Eastron"
        assert meter.sunspec is False
        assert len(meter.registers) == 14
        assert all(r.function_code == 4 and r.type == "float32"
                   for r in meter.registers)

    def test_word_swapped_block(self):
        control = builtin_profiles().register_map("solaredge-power-control")
        cos_phi = control.registers[-1]
        assert control.sunspec is True
        assert (cos_phi.name, cos_phi.address, cos_phi.word_order) == (
            "CosPhi", 61442, "little")

    def test_quirks(self):
        quirks = builtin_profiles().quirks
        assert [q.name for q in quirks] == ["fimer-max-50-registers",
                                            "huawei-sdongle-timing"]
        assert quirks[0].limits == Limits(max_registers=50)
        assert quirks[1].limits == Limits(request_gap=0.06, connect_delay=1.1)


class TestRegisterDecode:
    def test_word_and_byte_order(self):
        register = Register("x", 3, 0, "uint32", word_order="little",
                            byte_order="little")
        # Low word first, and the low byte first within each word: 0x12345678.
        assert register.decode([0x7856, 0x3412]) == 0x12345678

    def test_multiplier_exact(self):
        register = Register("x", 3, 0, "uint16", multiplier=Decimal("0.1"))
        assert register.decode([2345]) == 234.5

    def test_exponent_exact(self):
        register = Register("x", 3, 0, "int16", exponent=-2)
        assert register.decode([0xFFFE]) == -0.02

    def test_no_value(self):
        register = Register("x", 3, 0, "uint32", no_value=(0xFFFFFFFF,))
        assert register.decode([0xFFFF, 0xFFFF]) is None
        assert register.decode([0xFFFF, 0xFFFE]) == 4294967294.0

    def test_float32_shortest_decimal(self):
        register = Register("x", 4, 0, "float32")
        assert register.decode([0x4366, 0xF852]) == 230.97
        assert register.decode([0x7FC0, 0x0000]) is None

    def test_uint64(self):
        register = Register("x", 3, 0, "uint64")
        assert register.decode([0, 0, 1, 2]) == 65538.0


class TestPlan:
    def test_merges_within_limit(self):
        meter = builtin_profiles().register_map("eastron-sdm630")
        assert meter.plan(125) == [ProfileRead(4, 0, 76)]
        assert meter.plan(50) == [ProfileRead(4, 0, 18), ProfileRead(4, 52, 24)]

    def test_function_codes_apart(self, tmp_path):
        text = METER + '\n[[registers]]\nname = "S"\naddress = 2\ntype = "uint16"\n' \
            "function_code = 3\n"
        write(tmp_path, "acme", text)
        register_map = load_profiles(tmp_path).register_map("acme")
        assert register_map.plan(125) == [ProfileRead(3, 2, 1), ProfileRead(4, 0, 12)]


class TestLoading:
    def test_profiles_dir_adds_and_overrides(self, tmp_path):
        write(tmp_path, "acme", METER)
        write(tmp_path, "eastron-sdm630", METER.replace("Acme", "Mine"))
        profiles = load_profiles(tmp_path)
        acme = profiles.register_map("acme")
        assert [r.name for r in acme.registers] == ["V", "E"]
        assert acme.registers[1].no_value == (0xFFFFFFFF,)
        assert profiles.register_map("eastron-sdm630").manufacturer == "Mine"
        assert "solaredge-power-control" in profiles.register_maps

    def test_register_problems_name_lines(self, tmp_path):
        text = METER.replace('word_order = "little"', 'word_order = "middle"') \
                    + '\n[[registers]]\naddress = 70000\ntype = "uint16"\n' \
                    'scale = 0.1\nscale_exponent = -1\ncolour = "red"\n' \
                    'no_value = ["FFFFF"]\n'
        path = write(tmp_path, "acme", text)
        assert problems(tmp_path) == [
            f'{path}:16: registers[2].word_order is "middle"; it must be one of '
            '"big", "little"',
            f"{path}:26: registers[3].colour is not a known key; use one of name, "
            "function_code, address, type, word_order, byte_order, scale, "
            "scale_exponent, unit, no_value, description",
            f'{path}:21: registers[3].name is missing; add name = "..." (the channel '
            "becomes profile.<name>)",
            f"{path}:22: registers[3].address is 70000; it must be an integer 0-65535 "
            "(0-based, as sent on the wire)",
            f"{path}:25: registers[3].scale and registers[3].scale_exponent are both "
            "set; keep one",
            f'{path}:27: registers[3].no_value is ["FFFFF"]; it must be a list of hex '
            'strings of up to 4 digits, e.g. ["FFFF"]',
        ]

    def test_duplicate_name(self, tmp_path):
        path = write(tmp_path, "acme", METER.replace('name = "E"', 'name = "V"'))
        assert problems(tmp_path) == [
            f'{path}:13: registers[2].name "V" is used twice; give each register its '
            "own name"]

    def test_unknown_type(self, tmp_path):
        path = write(tmp_path, "acme", METER.replace('"uint32"', '"float"'))
        assert problems(tmp_path) == [
            f'{path}:15: registers[2].type is "float"; it must be one of uint16, '
            "int16, uint32, int32, uint64, float32"]

    # Values that passed check-config and then got every batch rejected, or raised.
    @pytest.mark.parametrize("old, new, expected", [
        ('unit = "kWh"', 'unit = "kilowatt-hours per square metre per day"',
         '18: registers[2].unit "kilowatt-hours per square metre per day" has 39 '
         "characters, more than the collector's limit of 32; shorten it"),
        ('unit = "kWh"', 'unit = "k\\u0000Wh"',
         '18: registers[2].unit "k\\u0000Wh" contains the control character '
         "U+0000; remove it"),
        ('model = "M3"', f'model = "{"M" * 201}"',
         f'3: device.model "{"M" * 201}" has 201 characters, more than the '
         "collector's limit of 200; shorten it"),
        ('name = "E"', f'name = "{"E" * 193}"',
         f'13: registers[2].name is "{"E" * 193}"; it must be letters, digits and _ '
         'only, at most 192, e.g. "V_L1"'),
        ('type = "uint32"', 'type = ["uint32"]',
         '15: registers[2].type is ["uint32"]; it must be one of uint16, int16, '
         "uint32, int32, uint64, float32"),
        ('word_order = "little"', "word_order = {a = 1}",
         '16: registers[2].word_order is {"a": 1}; it must be one of "big", '
         '"little"'),
        ("scale_exponent = -1", "scale_exponent = 400",
         "17: registers[2].scale_exponent is 400; it must be an integer from -10 to "
         "10 (the power of ten)"),
        ("scale_exponent = -1", "scale = inf",
         "17: registers[2].scale is inf; it must be a finite non-zero number (the "
         "multiplier)"),
        ("function_code = 4", "function_code = 4\nrequest_gap = inf",
         "5: device.request_gap is inf; it must be a number of seconds 0-10"),
    ])
    def test_unusable_value(self, tmp_path, old, new, expected):
        path = write(tmp_path, "acme", METER.replace(old, new))
        assert problems(tmp_path) == [f"{path}:{expected}"]

    def test_register_not_table(self, tmp_path):
        path = write(tmp_path, "acme", "registers = [1]\n")
        assert problems(tmp_path) == [
            f"{path}:1: registers[1] must be a table; write it as [[registers]]"]

    def test_address_past_end(self, tmp_path):
        path = write(tmp_path, "acme", METER.replace("address = 10", "address = 65535"))
        assert problems(tmp_path) == [
            f"{path}:14: registers[2].address 65535 with type uint32 runs past "
            "register 65535; check the address"]

    def test_invalid_toml(self, tmp_path):
        path = write(tmp_path, "acme", METER.replace('model = "M3"', "model = "))
        assert problems(tmp_path) == [
            f"{path}:3: invalid TOML: Invalid value (at line 3, column 9); fix the "
            "syntax on that line"]

    def test_neither_kind(self, tmp_path):
        path = write(tmp_path, "acme", '[device]\nmanufacturer = "Acme"\n')
        assert problems(tmp_path) == [
            f"{path}:1: the file has no [[registers]] or [[quirks]] tables; add "
            "[[registers]] for a register map or [[quirks]] for SunSpec quirks"]

    def test_quirk_problems(self, tmp_path):
        path = write(tmp_path, "quirks", (
            '[[quirks]]\nname = "bad"\nmanufacturer_regex = "Solar(Edge"\n'
            "max_registers = 200\n\n"
            '[[quirks]]\nname = "empty"\nmanufacturer = "X*"\n\n'
            '[[quirks]]\nname = "nobody"\nskip = [[40200, 40100]]\n'))
        assert problems(tmp_path) == [
            f"{path}:3: quirks[1].manufacturer_regex is not a valid regular "
            "expression (missing ), unterminated subpattern at position 5); fix the "
            "pattern",
            f"{path}:4: quirks[1].max_registers is 200; it must be an integer 1-125",
            f"{path}:6: quirks[2] sets nothing; add max_registers, request_gap, "
            "connect_delay, close_after_poll or skip",
            f'{path}:10: quirks[3].manufacturer is missing; add manufacturer = "..." '
            '(a glob such as "SolarEdge*") or manufacturer_regex',
            f"{path}:12: quirks[3].skip is [[40200, 40100]]; it must be a list of "
            "[first, last] address pairs within 0-65535, e.g. [[40200, 40299]]",
        ]

    def test_missing_folder(self, tmp_path):
        with pytest.raises(ProfileError) as raised:
            load_profiles(tmp_path / "absent")
        assert str(raised.value) == (f"{tmp_path / 'absent'}: profiles folder not "
                                     "found; check profiles_dir")

    def test_unknown_register_map(self):
        with pytest.raises(ProfileError) as raised:
            builtin_profiles().register_map("sdm")
        assert str(raised.value) == ('no register map profile "sdm"; use one of: '
                                     "eastron-sdm630, solaredge-power-control")


class TestQuirkMatching:
    def test_glob_ignores_case(self, tmp_path):
        write(tmp_path, "quirks", '[[quirks]]\nname = "se"\nmanufacturer = '
              '"solaredge*"\nmodel = "SE*K"\nclose_after_poll = true\n')
        profiles = load_profiles(tmp_path)
        assert [q.name for q in profiles.quirks_for("SolarEdge", "SE10K")] == ["se"]
        assert profiles.quirks_for("SolarEdge", "SE10000") == []
        assert profiles.quirks_for(None, None) == []

    def test_regex(self, tmp_path):
        write(tmp_path, "quirks", '[[quirks]]\nname = "abb"\nmanufacturer_regex = '
              '"(ABB|FIMER)"\nrequest_gap = 0.2\n')
        profiles = load_profiles(tmp_path)
        matched = [q.name for q in profiles.quirks_for("fimer", "PVS-100")]
        assert matched == ["fimer-max-50-registers", "abb"]
        assert profiles.quirks_for("ABB Solar", "x") == []


class TestConfig:
    HEAD = ('[gateway]\nid = "gw"\n[collector]\nurl = "http://127.0.0.1:8080"\n'
            'token = "t"\n[buffer]\npath = "b.sqlite"\n')

    def write_config(self, tmp_path: Path, devices: str, head: str = "") -> Path:
        path = tmp_path / "agent.toml"
        path.write_text(head + self.HEAD + devices)
        return path

    def test_profile_for_all_units(self, tmp_path):
        path = self.write_config(tmp_path, '[[devices]]\nname = "meters"\n'
                                 'host = "127.0.0.1"\nunit_ids = [1, 2]\n'
                                 'profile = "eastron-sdm630"\n')
        group = load_config(path).devices[0]
        meter = builtin_profiles().register_map("eastron-sdm630")
        assert group.profiles == {1: meter, 2: meter}
        assert group.poll_options == {"profiles": {1: meter, 2: meter}}

    def test_unit_profiles(self, tmp_path):
        path = self.write_config(tmp_path, '[[devices]]\nname = "bus"\n'
                                 'host = "127.0.0.1"\nunit_ids = [1, 240]\n'
                                 'unit_profiles = {240 = "eastron-sdm630"}\n')
        group = load_config(path).devices[0]
        assert list(group.profiles) == [240]
        assert group.poll_options == {"profiles": group.profiles}

    def test_profile_problems(self, tmp_path):
        path = self.write_config(tmp_path, '[[devices]]\nname = "bus"\n'
                                 'host = "127.0.0.1"\nunit_ids = [1, 2]\n'
                                 'profile = "sdm"\n'
                                 'unit_profiles = {3 = "eastron-sdm630"}\n')
        assert check_config(path) == [
            f"{path}: devices[1].unit_profiles.3 names a unit id that is not in "
            "unit_ids; add it to unit_ids or remove it",
            f'{path}: devices[1].profile: no register map profile "sdm"; use one of: '
            "eastron-sdm630, solaredge-power-control",
        ]

    def test_profiles_dir(self, tmp_path):
        write(tmp_path / "profiles", "acme", METER)
        path = self.write_config(tmp_path, '[[devices]]\nname = "bus"\n'
                                 'host = "127.0.0.1"\nunit_ids = [1]\n'
                                 'profile = "acme"\n', head='profiles_dir = "profiles"\n')
        config = load_config(path)
        assert config.profiles_dir == tmp_path / "profiles"
        group = config.devices[0]
        assert group.profiles[1].manufacturer == "Acme"
        assert [q.name for q in group.quirks] == ["fimer-max-50-registers",
                                                  "huawei-sdongle-timing"]

    def test_bad_profile_in_check_config(self, tmp_path):
        profile = write(tmp_path / "profiles", "acme", METER.replace("10", "x"))
        path = self.write_config(tmp_path, '[[devices]]\nname = "bus"\n'
                                 'host = "127.0.0.1"\nunit_ids = [1]\n',
                                 head='profiles_dir = "profiles"\n')
        assert check_config(path) == [f"{profile}:14: invalid TOML: Invalid value (at "
                                      "line 14, column 11); fix the syntax on that line"]


class TestPollerHelpers:
    def test_tighten_never_loosens(self):
        settings = EndpointSettings(host="h", max_registers=40, request_gap=0.5)
        tightened = tighten(settings, Limits(max_registers=50, request_gap=0.1,
                                             connect_delay=1.0, close_after_poll=True))
        assert tightened.max_registers == 40
        assert tightened.request_gap == 0.5
        assert tightened.connect_delay == 1.0
        assert tightened.close_after_poll is True

    def test_skip_reads(self):
        reads = [Read(40000, 100), Read(40200, 10)]
        assert skip_reads(reads, [(40010, 40019), (40205, 40300)]) == [
            Read(40000, 10), Read(40020, 80), Read(40200, 5)]
        assert skip_reads(reads, []) == reads


def endpoint_for(port: int, **settings) -> ModbusEndpoint:
    return ModbusEndpoint(EndpointSettings(host="127.0.0.1", port=port, timeout=0.5,
                                           **settings))


class TestPollers:
    async def test_quirk_applied_after_discovery(self, serve_image):  # noqa: F811
        simulator = await serve_image("C10")
        endpoint = endpoint_for(simulator.port)
        poller = UnitPoller(endpoint, 1, address_label=simulator.address)
        try:
            first = await poller.poll()
            assert [q.name for q in poller.matched] == ["fimer-max-50-registers"]
            assert endpoint.settings.max_registers == 50
            second = await poller.poll()
        finally:
            await endpoint.close()
        assert first.state == DeviceState.ONLINE
        assert second.values == first.values

    async def test_quirk_skip_range(self, serve_image, tmp_path):  # noqa: F811
        write(tmp_path, "quirks", '[[quirks]]\nname = "skip-dc"\nmanufacturer = '
              '"SolarEdge"\nskip = [[40096, 40101]]\n')
        quirks = load_profiles(tmp_path).quirks
        simulator = await serve_image("C03")
        endpoint = endpoint_for(simulator.port)
        poller = UnitPoller(endpoint, 1, address_label=simulator.address,
                            quirks=quirks)
        try:
            await poller.poll()
            poll = await poller.poll()
        finally:
            await endpoint.close()
        # Model 103 at 40069: DCA 40096 to DCW_SF 40101 are never requested.
        assert poll.state == DeviceState.ONLINE
        assert poll.values["103.DCW"] is None
        assert poll.values["103.W"] == 3358.0
        assert [q.name for q in poller.matched] == ["skip-dc"]

    async def test_profile_poller_offline(self, serve_image):  # noqa: F811
        meter = builtin_profiles().register_map("eastron-sdm630")
        simulator = await serve_image("C19")
        endpoint = endpoint_for(simulator.port, max_registers=50)
        poller = ProfilePoller(endpoint, 1, meter, address_label=simulator.address,
                               wall_clock=lambda: 1764864000.0)
        try:
            online = await poller.poll()
            await simulator.stop()
            offline = await poller.poll()
        finally:
            await endpoint.close()
        assert online.state == DeviceState.ONLINE
        assert online.device.device_id == f"{simulator.address}/1"
        assert Channel("profile.V_L1", "V") in online.channels
        assert online.values["profile.Hz"] == 50.01
        assert offline == Poll(online.device, 1764864000000, DeviceState.OFFLINE)

    async def test_profile_read_split_on_reject(self, serve_image):  # noqa: F811
        meter = builtin_profiles().register_map("eastron-sdm630")
        simulator = await serve_image("C19")
        # The meter rejects reads over 50 registers; the first poll finds out.
        endpoint = endpoint_for(simulator.port, request_gap=0.11)
        poller = ProfilePoller(endpoint, 1, meter, address_label=simulator.address)
        try:
            first = await poller.poll()
            second = await poller.poll()
        finally:
            await endpoint.close()
        assert first.values["profile.kWh_import"] == 12873.42
        assert second.values == first.values
        assert all(read.count <= 50 for read in poller._plan)

    async def test_run_endpoint_with_profile(self, serve_image):  # noqa: F811
        meter = builtin_profiles().register_map("eastron-sdm630")
        simulator = await serve_image("C19")
        polls: list[Poll] = []
        stop = asyncio.Event()

        async def sink(poll: Poll) -> None:
            polls.append(poll)
            stop.set()

        settings = EndpointSettings(host="127.0.0.1", port=simulator.port,
                                    timeout=0.5, max_registers=50, request_gap=0.11)
        await asyncio.wait_for(
            run_endpoint(settings, [1], 3600.0, sink, stop, profiles={1: meter}), 5)
        assert polls[0].state == DeviceState.ONLINE
        assert polls[0].device.manufacturer == "Eastron"
        assert polls[0].values["profile.P_total"] == 1639.0
