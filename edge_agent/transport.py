"""Modbus endpoints: one connection per TCP address or serial bus, one request at once.

`ModbusEndpoint.read` connects lazily, splits long reads, paces requests and reconnects
with the agent's backoff policy. pymodbus errors are translated here, once, into the
`ModbusError` tree, whose messages name the endpoint, unit, address and count.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable
from typing import Any

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusIOException
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU

from edge_agent.endpoint import EndpointSettings
from edge_agent.errors import AgentError
from edge_agent.retry import Backoff

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Client = AsyncModbusTcpClient | AsyncModbusSerialClient

EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}
MAX_REGISTERS = 125  # protocol limit of one FC3/FC4 read
BUSY_CODE = 6
# NOTE: two retries 0.1 s apart are an estimate for devices that respond with
# exception 6 while busy. A device busy for longer raises exception 6 to the caller.
BUSY_RETRIES = 2
BUSY_WAIT = 0.1  # seconds; request_gap is used where it is longer


class ModbusError(AgentError):
    """A Modbus request or connection failed; the message names endpoint and request."""

    def __init__(
        self,
        message: str,
        *,
        label: str,
        unit: int | None = None,
        address: int | None = None,
        count: int | None = None,
    ) -> None:
        super().__init__(message)
        self.label = label
        self.unit = unit
        self.address = address
        self.count = count


class ModbusExceptionResponse(ModbusError):
    """The device responded with Modbus exception `code`; the connection stays open."""

    def __init__(
        self,
        message: str,
        *,
        code: int,
        label: str,
        unit: int | None = None,
        address: int | None = None,
        count: int | None = None,
    ) -> None:
        super().__init__(message, label=label, unit=unit, address=address, count=count)
        self.code = code


class ModbusTimeout(ModbusError):
    """No valid response arrived within the endpoint's timeout."""


class ModbusConnectionRefused(ModbusError):
    """The TCP connect was refused: nothing listens, or another client has the port."""


class ModbusDisconnected(ModbusError):
    """The endpoint is not connected: the connect failed or the connection was lost."""


class ModbusMalformedResponse(ModbusError):
    """A response frame could not be decoded, e.g. its length fields are wrong.

    The connection is closed, because the byte stream after a bad frame cannot be
    trusted, and the next read connects again.
    """


def split_read(address: int, count: int, max_registers: int) -> list[tuple[int, int]]:
    """Split a read into (address, count) pieces of at most `max_registers`."""
    return [
        (start, min(max_registers, address + count - start))
        for start in range(address, address + count, max_registers)
    ]


class ModbusEndpoint:
    """One Modbus TCP address or serial bus, shared by every unit id behind it.

    Requests go one at a time. While the endpoint is down and the next reconnect is not
    yet due, `read` raises at once instead of waiting, so a poller can report its
    devices offline on time.
    """

    def __init__(
        self,
        settings: EndpointSettings,
        *,
        backoff: Backoff = Backoff(),
        clock: Clock = time.monotonic,
    ) -> None:
        self.settings = settings
        self._backoff = backoff
        self._clock = clock
        self._lock = asyncio.Lock()
        self._client: Client | None = None
        self._connect_error: OSError | None = None
        self._failures = 0  # failed connects since the last success
        self._retry_at = 0.0
        self._down: ModbusError | None = None  # last connect failure, while down
        self._last_response_at: float | None = None
        self._malformed: ModbusIOException | None = None  # frame error of this request

    @property
    def label(self) -> str:
        """Address for messages: "host:port" or the serial port."""
        return self.settings.label

    @property
    def connected(self) -> bool:
        """Tell whether a connection is open now."""
        return self._client is not None and self._client.connected

    async def read(
        self, unit: int, address: int, count: int, function_code: int | None = None
    ) -> list[int]:
        """Read `count` registers from `address` of `unit` with FC3 or FC4.

        Reads longer than the endpoint's max_registers are split into several requests.

        :raises ModbusExceptionResponse: the device responded with an exception code.
        :raises ModbusTimeout: no response within the timeout.
        :raises ModbusConnectionRefused: the TCP connect was refused.
        :raises ModbusDisconnected: the endpoint cannot connect or lost its connection.
        """
        function_code = function_code or self.settings.function_code
        _check_read(self.label, unit, address, count, function_code)
        max_registers = min(self.settings.max_registers, MAX_REGISTERS)

        async with self._lock:
            client = await self._connected_client()
            words: list[int] = []
            for start, size in split_read(address, count, max_registers):
                words += await self._read_piece(
                    client, unit, start, size, function_code
                )
            return words

    async def end_poll(self) -> None:
        """Close the connection after a poll where the device needs that."""
        if not self.settings.close_after_poll:
            return
        async with self._lock:
            self._close_client()

    async def close(self) -> None:
        """Close the connection; a later read connects again."""
        async with self._lock:
            self._close_client()

    # Connection

    async def _connected_client(self) -> Client:
        if self._client is not None and self._client.connected:
            return self._client
        self._close_client()
        wait = self._retry_at - self._clock()
        if self._down is not None and wait > 0:
            raise type(self._down)(
                f"{self._down}; next attempt in {wait:.1f} s", label=self.label
            )

        client = self._make_client()
        if not await client.connect():
            raise self._connect_failed()
        self._client = client
        self._connect_succeeded()
        if self.settings.connect_delay:
            await asyncio.sleep(self.settings.connect_delay)
        self._last_response_at = None
        return client

    def _make_client(self) -> Client:
        settings = self.settings
        options = {
            "timeout": settings.timeout,
            "retries": 0,
            # Reconnects follow the agent's backoff, not pymodbus's.
            "reconnect_delay": 0,
            "name": self.label,
        }
        if settings.transport == "rtu":
            client: Client = AsyncModbusSerialClient(
                str(settings.serial_port), framer=FramerType.RTU,
                baudrate=settings.baudrate, bytesize=settings.bytesize,
                parity=settings.parity, stopbits=settings.stopbits, **options,
            )
        else:
            framer = FramerType.SOCKET
            if settings.transport == "rtu-over-tcp":
                framer = FramerType.RTU
            client = AsyncModbusTcpClient(
                str(settings.host), port=settings.port, framer=framer, **options
            )
        self._keep_connect_error(client)
        self._catch_malformed_frames(client)
        return client

    def _catch_malformed_frames(self, client: Client) -> None:
        """Fail the pending request when pymodbus cannot decode a response frame.

        pymodbus 3.16 raises ModbusIOException out of the protocol's data_received for
        a frame whose MBAP length or byte count is wrong. asyncio then logs a full
        traceback ("Fatal error: protocol.data_received() call failed") and drops the
        connection, while the request waits for its timeout. Catching the error where
        pymodbus decodes the buffer keeps the traceback out of the log and lets
        `_request` raise ModbusMalformedResponse at once.
        """
        manager = client.ctx
        decode = manager.callback_data

        def decode_or_fail(data: bytes, addr: tuple | None = None) -> int:
            try:
                return decode(data, addr=addr)
            except ModbusIOException as err:
                self._malformed = err
                if not manager.response_future.done():
                    manager.response_future.set_exception(err)
                return len(data)  # drop the undecodable bytes

        manager.callback_data = decode_or_fail

    def _keep_connect_error(self, client: Client) -> None:
        """Record the OSError of a failed connect, which pymodbus turns into False.

        The agent reports a refused TCP connect (a port held by another client) apart
        from other failures, so the error is caught where pymodbus opens the transport.
        """
        create = client.ctx.call_create
        self._connect_error = None

        async def create_and_keep_error():
            try:
                return await create()
            except OSError as err:
                self._connect_error = err
                raise

        client.ctx.call_create = create_and_keep_error

    def _connect_failed(self) -> ModbusError:
        self._failures += 1
        self._retry_at = self._clock() + self._backoff.delay(self._failures)
        error = self._connect_error
        if isinstance(error, ConnectionRefusedError) or (
            error is not None and error.errno == errno.ECONNREFUSED
        ):
            failure: ModbusError = ModbusConnectionRefused(
                f"{self.label}: connection refused; check the port, and that no other "
                "client holds the device's only connection",
                label=self.label,
            )
        else:
            reason = _describe_os_error(error, self.settings)
            failure = ModbusDisconnected(
                f"{self.label}: cannot connect: {reason}", label=self.label
            )
        if self._down is None:
            log.warning("%s; retrying with backoff", failure)
        self._down = failure
        return failure

    def _connect_succeeded(self) -> None:
        if self._down is not None:
            log.info("%s: connected again after %d failed attempts",
                     self.label, self._failures)
        else:
            log.debug("%s: connected", self.label)
        self._down = None
        self._failures = 0
        self._retry_at = 0.0

    def _close_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
            log.debug("%s: connection closed", self.label)

    # Requests

    async def _read_piece(
        self, client: Client, unit: int, address: int, count: int, function_code: int
    ) -> list[int]:
        """Read at most one request's worth of registers, retrying while busy."""
        for attempt in range(BUSY_RETRIES + 1):
            await self._wait_for_gap()
            response = await self._request(client, unit, address, count, function_code)
            code = response.exception_code if response.isError() else None
            if code != BUSY_CODE or attempt == BUSY_RETRIES:
                break
            log.debug("%s unit %d: busy, retrying", self.label, unit)
            await asyncio.sleep(BUSY_WAIT)

        where = _describe_request(self.label, unit, address, count, function_code)
        request: dict[str, Any] = {
            "label": self.label, "unit": unit, "address": address, "count": count
        }
        if code is not None:
            name = EXCEPTION_NAMES.get(code, "unknown exception")
            raise ModbusExceptionResponse(
                f"{where}: device responded with exception {code} ({name})",
                code=code, **request,
            )
        registers = list(response.registers)
        if len(registers) != count:
            raise ModbusError(
                f"{where}: response has {len(registers)} registers, expected {count}",
                **request,
            )
        return registers

    async def _request(
        self, client: Client, unit: int, address: int, count: int, function_code: int
    ) -> ModbusPDU:
        """Send one read request and translate pymodbus errors."""
        read = (
            client.read_holding_registers if function_code == 3
            else client.read_input_registers
        )
        where = _describe_request(self.label, unit, address, count, function_code)
        request: dict[str, Any] = {
            "label": self.label, "unit": unit, "address": address, "count": count
        }
        self._malformed = None
        try:
            return await read(address, count=count, device_id=unit)
        except ModbusIOException as err:
            if self._malformed is not None:
                self._close_client()
                raise ModbusMalformedResponse(
                    f"{where}: malformed response, its length fields do not match its "
                    "data; closed the connection, reconnecting on the next read",
                    **request,
                ) from err
            if not client.connected:
                # pymodbus closes a TCP connection after several requests in a row
                # went unanswered.
                raise ModbusDisconnected(
                    f"{where}: no response, and the connection was closed; "
                    "reconnecting on the next read", **request,
                ) from err
            raise ModbusTimeout(
                f"{where}: no response within {self.settings.timeout:g} s; check the "
                "unit id, the wiring and that the device is awake", **request,
            ) from err
        except ConnectionException as err:
            raise ModbusDisconnected(
                f"{where}: connection lost; reconnecting on the next read", **request,
            ) from err
        finally:
            self._last_response_at = self._clock()

    async def _wait_for_gap(self) -> None:
        gap = self.settings.request_gap
        if not gap or self._last_response_at is None:
            return
        wait = self._last_response_at + gap - self._clock()
        if wait > 0:
            await asyncio.sleep(wait)


def _check_read(label: str, unit: int, address: int, count: int, function_code: int):
    if function_code not in (3, 4):
        raise ModbusError(
            f"{label}: function code {function_code} is not a register read; "
            "use 3 or 4",
            label=label,
        )
    if not 0 <= unit <= 255:
        raise ModbusError(f"{label}: unit id {unit} is out of range 0-255", label=label)
    if count < 1 or address < 0 or address + count > 0x10000:
        raise ModbusError(
            f"{label} unit {unit}: read of {count} registers at {address} is outside "
            "the address range 0-65535",
            label=label,
        )


def _describe_request(
    label: str, unit: int, address: int, count: int, function_code: int
) -> str:
    return f"{label} unit {unit}: read {address} count {count} (FC{function_code})"


def _describe_os_error(error: OSError | None, settings: EndpointSettings) -> str:
    if settings.transport == "rtu":
        fix = "check serial_port and that the agent may open it"
    else:
        fix = "check host, port and the network"
    if error is None:
        return f"no connection within {settings.timeout:g} s; {fix}"
    return f"{error.strerror or error}; {fix}"
