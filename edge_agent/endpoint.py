"""Settings of one Modbus endpoint: a TCP address or a serial bus, and how to talk to it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Transport = Literal["tcp", "rtu", "rtu-over-tcp"]

# Upper bounds of the timing settings, in seconds, for config and profile checks. A
# device that needs more is broken, and a larger value only hides that the endpoint
# hangs: one request of a bus waits for the one before it.
MAX_TIMEOUT = 60.0
MAX_REQUEST_GAP = 10.0
MAX_CONNECT_DELAY = 60.0


@dataclass(frozen=True, slots=True)
class EndpointSettings:
    """How to reach one endpoint; every unit id behind it shares one connection."""

    transport: Transport = "tcp"
    host: str | None = None  # tcp and rtu-over-tcp
    port: int = 502
    serial_port: str | None = None  # rtu, e.g. /dev/ttyUSB0
    baudrate: int = 9600
    parity: Literal["N", "E", "O"] = "N"
    stopbits: int = 1
    bytesize: int = 8
    timeout: float = 3.0  # seconds to wait for one response
    request_gap: float = 0.0  # seconds between one response and the next request
    connect_delay: float = 0.0  # seconds to wait after connecting before the first request
    max_registers: int = 125  # maximum registers per read request (protocol limit: 125)
    function_code: Literal[3, 4] = 3  # holding (3) or input (4) registers for SunSpec
    close_after_poll: bool = False  # for devices that drop idle connections

    @property
    def label(self) -> str:
        """Address for messages and device ids: "host:port" or the serial port."""
        if self.transport == "rtu":
            return str(self.serial_port)
        return f"{self.host}:{self.port}"
