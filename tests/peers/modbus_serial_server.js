// An independent Modbus TCP server for the driver's tests: the npm package `modbus-serial`
// (ServerTCP), not pymodbus, so the driver is checked against a second implementation of the
// protocol. Like a real PLC or serial gateway it answers exception 2 (illegal data address) for
// a register or bit it does not have, and exception 0x0B (gateway target failed to respond) for
// a unit id nobody answers to.
//
//   node tests/peers/modbus_serial_server.js PORT
//
// prints `modbus-serial listening on 127.0.0.1:PORT` once it listens, and one line
// `connections N` each time a client connects (N: connections so far).
//
// Map, per unit id u in 1 and 2 (0-based protocol addresses):
//   holding 0-15 and 24-31: u * 1000 + address; holding 16-23: unmapped (a gap);
//   holding 40-43: the uint64 1234567890123 with its 32-bit halves swapped (EFGHABCD);
//   holding 44-47: the same value big-endian (ABCDEFGH); every other holding address: unmapped.
//   input 0-9: u * 100 + address.
//   coils 0-39: coil n on when n % 3 == 0; coil 40 and above: unmapped.
//   discrete inputs: none.
"use strict";

const ModbusRTU = require("modbus-serial");

const UNITS = new Set([1, 2]);
const VALUE_64 = 1234567890123n;

function illegalAddress(what) {
    const error = new Error(`illegal data address: ${what}`);
    error.modbusErrorCode = 0x02;
    return error;
}

function checkUnit(unitID) {
    if (!UNITS.has(unitID)) {
        const error = new Error(`no unit ${unitID}`);
        error.modbusErrorCode = 0x0b;
        throw error;
    }
}

// The registers of a 64-bit value, most significant byte first, in the given byte order.
function registers64(order) {
    const big = Buffer.alloc(8);
    big.writeBigUInt64BE(VALUE_64);
    const raw = Buffer.from([...order].map((letter) => big[letter.charCodeAt(0) - 65]));
    return [0, 2, 4, 6].map((i) => raw.readUInt16BE(i));
}

const HALVES_SWAPPED = registers64("EFGHABCD");
const BIG_ENDIAN = registers64("ABCDEFGH");

const vector = {
    getHoldingRegister(address, unitID) {
        checkUnit(unitID);
        if ((address >= 0 && address <= 15) || (address >= 24 && address <= 31)) {
            return unitID * 1000 + address;
        }
        if (address >= 40 && address <= 43) {
            return HALVES_SWAPPED[address - 40];
        }
        if (address >= 44 && address <= 47) {
            return BIG_ENDIAN[address - 44];
        }
        throw illegalAddress(`holding register ${address}`);
    },
    getInputRegister(address, unitID) {
        checkUnit(unitID);
        if (address >= 0 && address <= 9) {
            return unitID * 100 + address;
        }
        throw illegalAddress(`input register ${address}`);
    },
    getCoil(address, unitID) {
        checkUnit(unitID);
        if (address >= 0 && address <= 39) {
            return address % 3 === 0;
        }
        throw illegalAddress(`coil ${address}`);
    },
    getDiscreteInput(address, unitID) {
        checkUnit(unitID);
        throw illegalAddress(`discrete input ${address}`);
    },
};

const port = Number(process.argv[2] || 5020);
const server = new ModbusRTU.ServerTCP(vector, { host: "127.0.0.1", port, unitID: 255 });
let connections = 0;
server._server.on("connection", () => {
    connections += 1;
    console.log(`connections ${connections}`);
});
server.on("initialized", () => console.log(`modbus-serial listening on 127.0.0.1:${port}`));
server.on("serverError", (error) => {
    console.error(`modbus-serial server error: ${error.message}`);
    process.exit(1);
});
process.on("SIGTERM", () => server.close(() => process.exit(0)));
