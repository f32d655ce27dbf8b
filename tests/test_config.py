"""Agent config: valid files load into dataclasses, each bad input gets its exact line."""

from pathlib import Path

import pytest

from edge_agent.config import check_config, load_config
from edge_agent.endpoint import EndpointSettings
from edge_agent.errors import ConfigError

HEAD = """\
[gateway]
id = "gw-test"

[collector]
url = "http://127.0.0.1:8080"
token = "secret"

[buffer]
path = "buffer.sqlite"
"""

TCP_DEVICE = """
[[devices]]
name = "inverters"
host = "127.0.0.1"
unit_ids = [1, 2]
"""


EXAMPLE = Path(__file__).parent.parent / "config/agent.example.toml"
EXAMPLE_TOKEN = 'token = "replace-with-the-gateway-token"'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_example_config_loads(tmp_path):
    text = EXAMPLE.read_text()
    assert EXAMPLE_TOKEN in text
    config = load_config(write(tmp_path, text.replace(EXAMPLE_TOKEN, 'token = "t0k"')))
    assert config.gateway_id == "gw-site-a"
    assert config.collector.token == "t0k"
    assert config.devices[0].settings.host == "192.168.1.20"
    assert config.unit_count == 1


def test_example_config_placeholder_token():
    assert check_config(EXAMPLE) == [
        f'{EXAMPLE}: collector.token is still the placeholder '
        '"replace-with-the-gateway-token"; set it to the token printed by '
        "`solarfleet-collector gateways add`"
    ]


def test_placeholder_id_and_token(tmp_path):
    text = HEAD.replace('"gw-test"', '"replace-with-the-gateway-id"').replace(
        '"secret"', '"replace-with-the-gateway-token"')
    path = write(tmp_path, text + TCP_DEVICE)
    assert check_config(path) == [
        f'{path}: gateway.id is still the placeholder "replace-with-the-gateway-id"; '
        "set it to the id registered with `solarfleet-collector gateways add`",
        f'{path}: collector.token is still the placeholder '
        '"replace-with-the-gateway-token"; set it to the token printed by '
        "`solarfleet-collector gateways add`",
    ]


def test_minimal_config_defaults(tmp_path):
    path = write(tmp_path, HEAD + TCP_DEVICE)
    config = load_config(path)

    assert config.gateway_id == "gw-test"
    assert config.collector.url == "http://127.0.0.1:8080"
    assert config.collector.token == "secret"
    assert config.collector.batch_size == 5000
    assert config.collector.interval == 5.0
    assert config.collector.timeout == 30.0
    assert config.buffer.path == tmp_path / "buffer.sqlite"
    assert config.buffer.synchronous == "full"
    group = config.devices[0]
    assert group.name == "inverters"
    assert group.unit_ids == (1, 2)
    assert group.poll_interval == 10.0
    assert group.settings == EndpointSettings(host="127.0.0.1")


def test_rtu_group_settings(tmp_path):
    path = write(tmp_path, HEAD + """
[[devices]]
name = "meters"
transport = "rtu"
serial_port = "/dev/ttyUSB0"
baudrate = 19200
parity = "E"
stopbits = 2
unit_ids = [240]
poll_interval = 2
timeout = 1
request_gap = 0.05
max_registers = 60
function_code = 4
close_after_poll = true
""")
    group = load_config(path).devices[0]
    assert group.settings == EndpointSettings(
        transport="rtu", serial_port="/dev/ttyUSB0", baudrate=19200, parity="E",
        stopbits=2, timeout=1.0, request_gap=0.05, max_registers=60, function_code=4,
        close_after_poll=True,
    )
    assert group.poll_interval == 2.0
    assert isinstance(group.poll_interval, float)


def test_token_not_in_repr(tmp_path):
    config = load_config(write(tmp_path, HEAD + TCP_DEVICE))
    assert "secret" not in repr(config)


def test_absolute_buffer_path_kept(tmp_path):
    text = HEAD.replace('"buffer.sqlite"', '"/var/lib/agent/buffer.sqlite"')
    config = load_config(write(tmp_path, text + TCP_DEVICE))
    assert config.buffer.path == Path("/var/lib/agent/buffer.sqlite")


# (replaced text, replacement, expected problem after "<file>: ")
DEVICE_CASES = [
    ('host = "127.0.0.1"', 'host = "127.0.0.1"\nport = 70000',
     "devices[1].port must be an integer 1-65535, got 70000"),
    ('host = "127.0.0.1"', 'host = "127.0.0.1"\nport = "502"',
     'devices[1].port must be an integer 1-65535, got "502"'),
    ('host = "127.0.0.1"', 'host = "127.0.0.1"\nprot = 502',
     "devices[1].prot is not a known key; did you mean port?"),
    ('host = "127.0.0.1"', 'host = "127.0.0.1"\ncolour = "red"',
     "devices[1].colour is not a known key; remove it"),
    ('host = "127.0.0.1"\n', "",
     "devices[1].host is missing; set it to the device's IP address or host name"),
    ('host = "127.0.0.1"', 'host = ""',
     'devices[1].host must be a non-empty string, got ""'),
    ("unit_ids = [1, 2]", "unit_ids = [1, 248]",
     "devices[1].unit_ids[2] must be an integer 1-247 (the Modbus range for one "
     "device), got 248"),
    ("unit_ids = [1, 2]", "unit_ids = [0]",
     "devices[1].unit_ids[1] must be an integer 1-247 (the Modbus range for one "
     "device), got 0"),
    ("unit_ids = [1, 2]", "unit_ids = [3, 3]",
     "devices[1].unit_ids lists unit id 3 twice; remove one"),
    ("unit_ids = [1, 2]", "unit_ids = []",
     "devices[1].unit_ids must be a non-empty list of unit ids, e.g. [1, 2], got []"),
    ("unit_ids = [1, 2]", "unit_ids = 1",
     "devices[1].unit_ids must be a non-empty list of unit ids, e.g. [1, 2], got 1"),
    ("unit_ids = [1, 2]\n", "",
     "devices[1].unit_ids is missing; list the Modbus unit ids behind this endpoint, "
     "e.g. [1]"),
    ("unit_ids = [1, 2]", "unit_ids = [1]\npoll_interval = 0",
     "devices[1].poll_interval must be a number of seconds > 0 and at most 86400, got 0"),
    ("unit_ids = [1, 2]", "unit_ids = [1]\ntimeout = -1.5",
     "devices[1].timeout must be a number of seconds > 0 and at most 60, got -1.5"),
    ("unit_ids = [1, 2]", "unit_ids = [1]\nrequest_gap = -0.1",
     "devices[1].request_gap must be a number of seconds 0-10, got -0.1"),
    ("unit_ids = [1, 2]", "unit_ids = [1]\nmax_registers = 126",
     "devices[1].max_registers must be an integer 1-125, got 126"),
    ("unit_ids = [1, 2]", "unit_ids = [1]\nmax_registers = 0",
     "devices[1].max_registers must be an integer 1-125, got 0"),
    ("unit_ids = [1, 2]", "unit_ids = [1]\nfunction_code = 6",
     "devices[1].function_code must be one of 3, 4, got 6"),
    ("unit_ids = [1, 2]", 'unit_ids = [1]\nclose_after_poll = "yes"',
     'devices[1].close_after_poll must be true or false, got "yes"'),
    ('name = "inverters"', 'name = "inverters"\ntransport = "udp"',
     'devices[1].transport must be one of "tcp", "rtu", "rtu-over-tcp", got "udp"'),
    ('host = "127.0.0.1"', 'host = "127.0.0.1"\nbaudrate = 9600',
     'devices[1].baudrate does not apply to transport "tcp"; remove it or set '
     'transport = "rtu"'),
    ('name = "inverters"\n', "",
     "devices[1].name is missing; give each [[devices]] table a name"),
]


@pytest.mark.parametrize("old, new, expected", DEVICE_CASES)
def test_device_problem(tmp_path, old, new, expected):
    path = write(tmp_path, HEAD + TCP_DEVICE.replace(old, new))
    assert check_config(path) == [f"{path}: {expected}"]


RTU_DEVICE = """
[[devices]]
name = "meters"
transport = "rtu"
serial_port = "/dev/ttyUSB0"
unit_ids = [240]
"""

RTU_CASES = [
    ('serial_port = "/dev/ttyUSB0"\n', "",
     'devices[1].serial_port is missing; set it to the serial device, e.g. '
     '"/dev/ttyUSB0"'),
    ("unit_ids", 'host = "10.0.0.1"\nunit_ids',
     'devices[1].host does not apply to transport "rtu"; remove it or set '
     'transport = "tcp"'),
    ("unit_ids", 'parity = "X"\nunit_ids',
     'devices[1].parity must be one of "N", "E", "O", got "X"'),
    ("unit_ids", "stopbits = 1.0\nunit_ids",
     "devices[1].stopbits must be one of 1, 2, got 1.0"),
    ("unit_ids", "bytesize = 9\nunit_ids",
     "devices[1].bytesize must be an integer 5-8, got 9"),
    ("unit_ids", "baudrate = 0\nunit_ids",
     "devices[1].baudrate must be an integer 1-4000000, got 0"),
    ('"/dev/ttyUSB0"', '"/dev/tty\\u0000"',
     'devices[1].serial_port "/dev/tty\\u0000" contains the control character '
     "U+0000; remove it"),
]


@pytest.mark.parametrize("old, new, expected", RTU_CASES)
def test_rtu_problem(tmp_path, old, new, expected):
    path = write(tmp_path, HEAD + RTU_DEVICE.replace(old, new))
    assert check_config(path) == [f"{path}: {expected}"]


TOP_CASES = [
    ('id = "gw-test"', 'id = ""', 'gateway.id must be a non-empty string, got ""'),
    ('url = "http://127.0.0.1:8080"', 'url = "127.0.0.1:8080"',
     'collector.url must be an http:// or https:// URL with a host and a port '
     '1-65535, e.g. "https://collector.example.com", got "127.0.0.1:8080"'),
    ('token = "secret"\n', "",
     "collector.token is missing; set it to the token from `solarfleet-collector "
     "gateways add`"),
    ('token = "secret"', 'token = "secret"\nbatch_size = 0',
     "collector.batch_size must be an integer 1-50000, got 0"),
    ('token = "secret"', 'token = "secret"\ninterval = false',
     "collector.interval must be a number of seconds > 0 and at most 3600, got false"),
    ('token = "secret"', 'token = "secret"\ntoken_file = "x"',
     "collector.token_file is not a known key; did you mean token?"),
    ('path = "buffer.sqlite"', 'path = "buffer.sqlite"\nsynchronous = "off"',
     'buffer.synchronous must be one of "full", "normal", got "off"'),
    ('id = "gw-test"', 'id = "replace-with-gw"',
     'gateway.id is still the placeholder "replace-with-gw"; set it to the id '
     "registered with `solarfleet-collector gateways add`"),
    ('[gateway]\nid = "gw-test"\n', "",
     "[gateway] is missing; add it with id"),
    ("[buffer]", "[bufer]", "bufer is not a known key; did you mean buffer?"),
]


# Values of the right type that `run` could not use: every number is bounded, every
# string fits the collector's limits and none carries a control character.
UNUSABLE_CASES = [
    ('id = "gw-test"', f'id = "{"g" * 201}"',
     f'gateway.id "{"g" * 201}" has 201 characters, more than the collector\'s '
     "limit of 200; shorten it"),
    ('id = "gw-test"', 'id = "gw\\u0000"',
     'gateway.id "gw\\u0000" contains the control character U+0000; remove it'),
    ('token = "secret"', 'token = "a\\r\\nX-Evil: 1"',
     "collector.token must be the token of visible ASCII characters, without spaces "
     'or line breaks, got "a\\r\\nX-Evil: 1"'),
    ('token = "secret"', 'token = "secret"\ntimeout = inf',
     "collector.timeout must be a number of seconds > 0 and at most 600, got inf"),
    ('token = "secret"', 'token = "secret"\ninterval = 1e300',
     "collector.interval must be a number of seconds > 0 and at most 3600, got 1e+300"),
    ('token = "secret"', 'token = "secret"\ninterval = nan',
     "collector.interval must be a number of seconds > 0 and at most 3600, got nan"),
    ('token = "secret"', 'token = "secret"\nbatch_size = 100000000000000000000',
     "collector.batch_size must be an integer 1-50000, got 100000000000000000000"),
    ('token = "secret"', 'token = "secret"\nbatch_size = 50001',
     "collector.batch_size must be an integer 1-50000, got 50001"),
]
URL_CASES = ["http://example.com:99999/x", "http://[::1", "http://exa mple.com/x",
             "http://127.0.0.1:0", "ftp://127.0.0.1", "http://"]


@pytest.mark.parametrize("old, new, expected", UNUSABLE_CASES)
def test_unusable_value(tmp_path, old, new, expected):
    path = write(tmp_path, HEAD.replace(old, new) + TCP_DEVICE)
    assert check_config(path) == [f"{path}: {expected}"]


@pytest.mark.parametrize("url", URL_CASES)
def test_invalid_url(tmp_path, url):
    path = write(tmp_path, HEAD.replace("http://127.0.0.1:8080", url) + TCP_DEVICE)
    assert check_config(path) == [
        f"{path}: collector.url must be an http:// or https:// URL with a host and a "
        f'port 1-65535, e.g. "https://collector.example.com", got "{url}"'
    ]


def test_ipv6_url_valid(tmp_path):
    path = write(tmp_path, HEAD.replace("127.0.0.1", "[::1]") + TCP_DEVICE)
    assert check_config(path) == []


# Values of the wrong type that once raised TypeError or ValueError while checked.
WRONG_TYPE_CASES = [
    ('name = "inverters"', 'name = "inverters"\ntransport = ["tcp"]',
     'devices[1].transport must be one of "tcp", "rtu", "rtu-over-tcp", got ["tcp"]'),
    ('name = "inverters"', 'name = "inverters"\ntransport = {a = 1}',
     'devices[1].transport must be one of "tcp", "rtu", "rtu-over-tcp", '
     'got {"a": 1}'),
    ("unit_ids = [1, 2]", 'unit_ids = [[1]]\nprofile = "eastron-sdm630"',
     "devices[1].unit_ids[1] must be an integer 1-247 (the Modbus range for one "
     "device), got [1]"),
    ("unit_ids = [1, 2]", 'unit_ids = [1]\nunit_profiles = {"\u00b2" = "x"}',
     "devices[1].unit_profiles.\u00b2 names a unit id that is not in unit_ids; add "
     "it to unit_ids or remove it"),
    ("unit_ids = [1, 2]", "unit_ids = [1]\ntimeout = inf",
     "devices[1].timeout must be a number of seconds > 0 and at most 60, got inf"),
    ("unit_ids = [1, 2]", "unit_ids = [1]\nrequest_gap = 1e300",
     "devices[1].request_gap must be a number of seconds 0-10, got 1e+300"),
    ('name = "inverters"', f'name = "{"n" * 201}"',
     f'devices[1].name "{"n" * 201}" has 201 characters, more than the collector\'s '
     "limit of 200; shorten it"),
]


@pytest.mark.parametrize("old, new, expected", WRONG_TYPE_CASES)
def test_device_value_checked(tmp_path, old, new, expected):
    path = write(tmp_path, HEAD + TCP_DEVICE.replace(old, new))
    assert check_config(path) == [f"{path}: {expected}"]


def test_byte_order_mark(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_bytes(b"\xef\xbb\xbf" + (HEAD + TCP_DEVICE).encode())
    assert check_config(path) == [
        f"{path}: the file starts with a UTF-8 byte order mark; remove it (save the "
        "file as UTF-8 without BOM)"
    ]


def test_empty_devices_list(tmp_path):
    path = write(tmp_path, "devices = []\n" + HEAD)
    assert check_config(path) == [
        f"{path}: devices has no [[devices]] tables, so the agent has nothing to "
        "poll; add one per Modbus endpoint"
    ]


@pytest.mark.parametrize("old, new, expected", TOP_CASES)
def test_top_level_problem(tmp_path, old, new, expected):
    path = write(tmp_path, HEAD.replace(old, new) + TCP_DEVICE)
    problems = check_config(path)
    assert problems[0] == f"{path}: {expected}"


def test_missing_buffer_table_lists_both(tmp_path):
    path = write(tmp_path, HEAD.replace("[buffer]", "[bufer]") + TCP_DEVICE)
    assert check_config(path) == [
        f"{path}: bufer is not a known key; did you mean buffer?",
        f"{path}: [buffer] is missing; add it with path",
    ]


def test_no_devices(tmp_path):
    path = write(tmp_path, HEAD)
    assert check_config(path) == [
        f"{path}: no [[devices]] table; add one per Modbus endpoint"
    ]


def test_duplicate_endpoint(tmp_path):
    second = TCP_DEVICE.replace('"inverters"', '"meters"').replace("[1, 2]", "[3]")
    path = write(tmp_path, HEAD + TCP_DEVICE + second)
    assert check_config(path) == [
        f'{path}: device groups "inverters" and "meters" both use 127.0.0.1:502; '
        "merge their unit_ids into one [[devices]] table"
    ]


def test_duplicate_group_name(tmp_path):
    second = TCP_DEVICE.replace("127.0.0.1", "127.0.0.2")
    path = write(tmp_path, HEAD + TCP_DEVICE + second)
    assert check_config(path) == [
        f'{path}: device group name "inverters" is used twice; give each '
        "[[devices]] table its own name"
    ]


def test_toml_syntax_error_has_line(tmp_path):
    path = write(tmp_path, HEAD + "[[devices]]\nname = inverters\n")
    assert check_config(path) == [
        f"{path}: invalid TOML: Invalid value (at line 11, column 8)"
    ]


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.toml"
    assert check_config(path) == [f"{path}: file not found; check the path"]


def test_load_raises_all_problems(tmp_path):
    text = TCP_DEVICE.replace("unit_ids = [1, 2]", "unit_ids = [0]\nport = 0")
    path = write(tmp_path, HEAD + text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).splitlines() == [
        f"{path}: devices[1].port must be an integer 1-65535, got 0",
        f"{path}: devices[1].unit_ids[1] must be an integer 1-247 (the Modbus range "
        "for one device), got 0",
    ]


def test_second_device_numbered(tmp_path):
    second = TCP_DEVICE.replace('"inverters"', '"meters"').replace(
        "127.0.0.1", "127.0.0.2").replace("unit_ids = [1, 2]", "unit_ids = [1]\nport = -1")
    path = write(tmp_path, HEAD + TCP_DEVICE + second)
    assert check_config(path) == [
        f"{path}: devices[2].port must be an integer 1-65535, got -1"
    ]
