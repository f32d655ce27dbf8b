"""Modbus server that serves a site image: one device per unit id on one port.

Registers live in pymodbus's simulator datastore (`SimDevice`), whose `action` hook
returns the device's exception ranges and the link's read size limit. Behaviour that
the datastore cannot express (no response at all, a response before the unit is
looked up, pacing per connection, refusing a second TCP client) sits in a request
handler subclass and a listener subclass.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Literal

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler
from pymodbus.simulator import DataType, SimData, SimDevice

from edge_agent.errors import AgentError
from edge_agent.images import (
    TABLES,
    DeviceImage,
    ImageError,
    LinkBehaviour,
    SiteImage,
    Table,
)

log = logging.getLogger(__name__)

Framer = Literal["tcp", "rtu-over-tcp", "rtu"]
Clock = Callable[[], float]

_NO_ANSWER = "no answer"
_BIT_FUNCTIONS = frozenset({1, 2, 5, 15})


class SimulatorError(AgentError):
    """The simulator cannot start, for example because its port is taken."""


class _Link:
    """Link-wide state: which requests get no response or an early exception."""

    def __init__(self, image: SiteImage, clock: Clock) -> None:
        self.behaviour = image.link
        self.devices = {device.unit: device for device in image.devices}
        self.clock = clock
        self.silent_unit: int | None = None
        self.last_reply_at: float | None = None

    def screen(self, request: ModbusPDU, connected_at: float) -> ExcCodes | str | None:
        """Return _NO_ANSWER, an exception code to send, or None to serve it."""
        behaviour = self.behaviour
        elapsed_ms = (self.clock() - connected_at) * 1000
        if elapsed_ms < behaviour.ignore_requests_within_ms_of_connect:
            return _NO_ANSWER
        if behaviour.min_gap_ms and self.last_reply_at is not None:
            if (self.clock() - self.last_reply_at) * 1000 < behaviour.min_gap_ms:
                return ExcCodes.DEVICE_BUSY

        device = self.devices.get(request.dev_id)
        if device is None:
            if behaviour.absent_units == "timeout":
                return _NO_ANSWER
            return ExcCodes.GATEWAY_NO_RESPONSE
        if request.dev_id == self.silent_unit:
            return _NO_ANSWER
        if device.unmapped == "timeout" and _reads_unmapped(device, request):
            return _NO_ANSWER
        return None

    def replied(self) -> None:
        self.last_reply_at = self.clock()


def _reads_unmapped(device: DeviceImage, request: ModbusPDU) -> bool:
    table = TABLES.get(request.function_code)
    if table is None:
        return False
    return not device.is_mapped(table, request.address, request.count)


class _RequestHandler(ServerRequestHandler):
    """One client connection: screens each request before pymodbus serves it.

    pymodbus responds to every request it decodes and raises on an unknown unit, so
    requests that get no response or exception 11 are decided here.
    """

    def __init__(self, server: _GatewayMixin) -> None:
        super().__init__(
            server, server.trace_packet, server.trace_pdu, server.trace_connect
        )
        self.gateway = server
        self.connected_at = 0.0

    def callback_connected(self) -> None:
        super().callback_connected()
        self.connected_at = self.gateway.link.clock()
        self.gateway.client_connected(self)

    def callback_disconnected(self, exc: Exception | None) -> None:
        super().callback_disconnected(exc)
        self.gateway.client_disconnected()

    async def handle_request(self) -> None:
        request = self.last_pdu
        if request is None:
            return
        outcome = self.gateway.link.screen(request, self.connected_at)
        if outcome == _NO_ANSWER:
            log.debug("unit %d: request dropped without a response", request.dev_id)
            return
        if isinstance(outcome, ExcCodes):
            response = ExceptionResponse(request.function_code, outcome)
            response.transaction_id = request.transaction_id
            response.dev_id = request.dev_id
            self.server_send(response, self.last_addr)
        else:
            await super().handle_request()
        self.gateway.link.replied()


class _GatewayMixin:
    """Server side of a site gateway: hands each connection to a _RequestHandler."""

    link: _Link
    trace_packet: Callable | None
    trace_pdu: Callable | None
    trace_connect: Callable | None

    def callback_new_connection(self) -> _RequestHandler:
        return _RequestHandler(self)

    def client_connected(self, handler: _RequestHandler) -> None:
        """Track a new client connection."""

    def client_disconnected(self) -> None:
        """Track a closed client connection."""


class _SerialGateway(_GatewayMixin, ModbusSerialServer):
    pass


class _TcpGateway(_GatewayMixin, ModbusTcpServer):
    """TCP listener that refuses connections beyond the link's max_clients.

    A device that takes one client at a time refuses the next TCP connect
    (ECONNREFUSED) instead of accepting and closing it, so the listening socket is
    closed while the limit is reached and opened again when a client leaves.
    """

    max_clients = 0
    bound: tuple[str, int] = ("", 0)
    stopping = False
    _relisten: asyncio.Task | None = None

    def client_connected(self, handler: _RequestHandler) -> None:
        if not self.max_clients:
            return
        if len(self.active_connections) > self.max_clients:
            # Accepted in the same batch as the client that reached the limit.
            handler.transport.abort()
        elif len(self.active_connections) == self.max_clients and self.transport:
            log.debug("%d clients connected; refusing more", self.max_clients)
            self.transport.close()
            self.transport = None

    def client_disconnected(self) -> None:
        if self.stopping or self.transport or self._relisten:
            return
        if len(self.active_connections) < self.max_clients:
            self._relisten = asyncio.create_task(self._listen_again())

    async def _listen_again(self) -> None:
        try:
            self.transport = await self.loop.create_server(
                self.handle_new_connection, *self.bound, reuse_address=True
            )
        finally:
            self._relisten = None

    async def shutdown(self) -> None:
        self.stopping = True
        if self._relisten:
            self._relisten.cancel()
        await super().shutdown()


class Simulator:
    """Serve a site image over Modbus TCP, RTU over TCP, or RTU on a serial port.

    Example::

        async with Simulator(load_image("C06.json"), port=0) as simulator:
            ...  # poll 127.0.0.1:simulator.port, units 1 and 240
    """

    def __init__(
        self,
        image: SiteImage,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        framer: Framer = "tcp",
        serial_port: str | None = None,
        baudrate: int = 9600,
        clock: Clock = time.monotonic,
    ) -> None:
        if framer == "rtu" and not serial_port:
            raise SimulatorError("the rtu framer needs a serial_port to serve on")
        self.image = image
        self.host = host
        self.port = port  # the bound port once started, where 0 asked for a free one
        self.framer = framer
        self.serial_port = serial_port
        self.baudrate = baudrate
        self.step: int | None = None
        self._link = _Link(image, clock)
        self._server: _TcpGateway | _SerialGateway | None = None

    @property
    def address(self) -> str:
        """Where the simulator serves: "host:port" or the serial port."""
        if self.framer == "rtu":
            return str(self.serial_port)
        return f"{self.host}:{self.port}"

    @property
    def clients(self) -> int:
        """Number of client connections open now."""
        return len(self._server.active_connections) if self._server else 0

    async def start(self) -> None:
        """Start serving; raise SimulatorError when the port cannot be opened."""
        image = self.image if self.step is None else self.image.at_step(self.step)
        devices = [_sim_device(device, image.link) for device in image.devices]
        self._server = self._make_server(devices)
        self._server.link = self._link
        try:
            await self._server.serve_forever(background=True)
        except RuntimeError as err:
            self._server = None
            raise SimulatorError(
                f"cannot serve on {self.address}: it is in use or not available; "
                "choose another port"
            ) from err
        if isinstance(self._server, _TcpGateway):
            self.port = self._server.transport.sockets[0].getsockname()[1]
            self._server.bound = (self.host, self.port)
        log.info("simulator %s serving units %s on %s", image.name,
                 ", ".join(map(str, image.units)), self.address)

    async def stop(self) -> None:
        """Stop serving and close every client connection."""
        if self._server is None:
            return
        server, self._server = self._server, None
        await server.shutdown()
        # Let the closed transports deliver connection_lost before returning.
        await asyncio.sleep(0)
        log.info("simulator %s stopped", self.image.name)

    async def apply_step(self, index: int) -> None:
        """Make step `index` current: patch registers and set who stays silent."""
        if not 0 <= index < len(self.image.steps):
            raise ImageError(
                f"{self.image.name}: no step {index}; "
                f"the image has {len(self.image.steps)} steps"
            )
        step = self.image.steps[index]
        self.step = index
        self._link.silent_unit = step.unit if step.silent else None
        if self._server is not None:
            await self._write_registers(self.image.at_step(index))

    async def write(
        self, unit: int, address: int, words: Sequence[int], table: Table = "holding"
    ) -> None:
        """Write `words` from `address` into one unit's registers while serving.

        Clients read the new words from their next request on. The image is not
        changed, so a restart serves the image's words again.

        :raises SimulatorError: the simulator is not serving.
        :raises ImageError: the unit is not in the image, a word is outside 0-0xFFFF,
            or a register lies outside the image's blocks.
        """
        if self._server is None:
            raise SimulatorError(
                f"simulator {self.image.name} is not serving; start it first"
            )
        device = self.image.device(unit)
        bad = next((word for word in words if not 0 <= word <= 0xFFFF), None)
        if bad is not None:
            raise ImageError(
                f"unit {unit}: word {bad} at {table} register {address} is outside "
                "0-65535"
            )
        if not words or not device.is_mapped(table, address, len(words)):
            raise ImageError(
                f"unit {unit}: {table} registers {address} count {len(words)} are not "
                "all in the image; write inside its blocks"
            )
        function_code = 3 if table == "holding" else 4
        await self._server.async_setValues(unit, function_code, address, list(words))

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _make_server(self, devices: list[SimDevice]) -> _TcpGateway | _SerialGateway:
        if self.framer == "rtu":
            return _SerialGateway(
                devices, framer=FramerType.RTU, port=str(self.serial_port),
                baudrate=self.baudrate,
            )
        framer = FramerType.RTU if self.framer == "rtu-over-tcp" else FramerType.SOCKET
        server = _TcpGateway(devices, framer=framer, address=(self.host, self.port))
        server.max_clients = self.image.link.max_clients
        return server

    async def _write_registers(self, image: SiteImage) -> None:
        """Write every block of every device through the datastore."""
        assert self._server is not None
        for device in image.devices:
            for function_code, table in TABLES.items():
                for block in device.blocks(table):
                    await self._server.async_setValues(
                        device.unit, function_code, block.address, list(block.words)
                    )


def _sim_device(device: DeviceImage, link: LinkBehaviour) -> SimDevice:
    """Build the pymodbus datastore of one device: holding and input tables apart."""
    holding = [_sim_data(block.address, block.words) for block in device.holding]
    input_ = [_sim_data(block.address, block.words) for block in device.input]
    # pymodbus needs at least one entry per table. Register tables take an invalid
    # entry (exception 2); bit tables must hold bits, and _check_read rejects them.
    return SimDevice(
        id=device.unit,
        simdata=(
            [SimData(0, values=False, datatype=DataType.BITS)],
            [SimData(0, values=False, datatype=DataType.BITS)],
            holding or [SimData(0, datatype=DataType.INVALID)],
            input_ or [SimData(0, datatype=DataType.INVALID)],
        ),
        action=functools.partial(_check_read, device, link),
    )


def _sim_data(address: int, words: tuple[int, ...]) -> SimData:
    return SimData(address, values=list(words), datatype=DataType.REGISTERS)


async def _check_read(
    device: DeviceImage,
    link: LinkBehaviour,
    function_code: int,
    start_address: int,
    address: int,
    count: int,
    registers: list[int],
    set_values: list[int] | list[bool] | None,
) -> ExcCodes | None:
    """Answer reads over the size limit or in an exception range with an exception."""
    if function_code in _BIT_FUNCTIONS:
        return ExcCodes.ILLEGAL_FUNCTION  # images hold no coils or discrete inputs
    if set_values is not None:
        return None  # register writes, including step patches, are accepted
    if count > link.max_registers_per_read:
        return ExcCodes.ILLEGAL_ADDRESS
    code = device.exception_for(address, count)
    return ExcCodes(code) if code is not None else None

