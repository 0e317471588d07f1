#!/usr/bin/env node
// An independent OPC UA peer for the gateway's tests: a PackML machine on node-opcua's server,
// typed by the OPC Foundation's own PackML NodeSet (OPC 30050, Opc.Ua.PackML.NodeSet2.xml as
// shipped in node-opcua-nodesets). Nothing here comes from the gateway's code or simulator.
//
// The machine is an instance of PackMLBaseObjectType under Objects, in the namespace
// urn:plantsync:test:packml-peer with string node ids (`s=<machine>`, children `s=<machine>-Admin-
// ProdProcessedCount` and so on, node-opcua's naming). As OPC 30050 defines them:
//   Admin.ProdProcessedCount, Admin.ProdDefectiveCount: arrays of PackMLCountDataType
//     {ID, Name, Unit, Count, AccCount}, one element per material (here one, ID 1);
//   Admin.StopReason: a PackMLAlarmDataType {ID, Value, Message, Category, DateTime, ...};
//   BaseStateMachine / MachineState / ExecuteState: nested state machines whose CurrentState
//     (LocalizedText, with the Id of the state object and its Number) says the state.
// In Execute the counts advance at --rate per second. Commands on stdin, one per line:
//   state <Name> [<stop id> <message...>]   move to a PackML state (Held, Stopped, Execute...)
//   count <processed> [<defective>]         count units at once
//   sessions                                print "sessions <n>" (the server's session count)
// It prints "packml-server listening on <endpoint>" once it accepts connections, and obeys
// SIGTERM. The server allows 10 sessions (node-opcua's default) unless --max-sessions says
// otherwise, and 10 more connections than sessions.
"use strict";
const readline = require("readline");
const {
  OPCUAServer, nodesets, DataType, Variant, LocalizedText, MessageSecurityMode, SecurityPolicy,
  NodeId,
} = require("node-opcua");

function options(argv) {
  const parsed = { port: 4840, rate: 10, start: 0, machine: "filler-07", maxSessions: 10,
                   sessionTimeoutMax: 0 };
  for (let i = 2; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, "").replace(/-(.)/g, (_, c) => c.toUpperCase());
    if (!(key in parsed)) throw new Error(`unknown option ${argv[i]}`);
    parsed[key] = typeof parsed[key] === "number" ? Number(argv[i + 1]) : argv[i + 1];
  }
  return parsed;
}

const PACKML = "http://opcfoundation.org/UA/PackML/";
const NAMESPACE = "urn:plantsync:test:packml-peer";
// Where each PackML state lives in OPC 30050's nested state machines (ISA-TR88 numbers are the
// state objects' StateNumber).
const MACHINE_STATES = new Set(["Stopped", "Stopping", "Resetting", "Running"]);
const BASE_STATES = new Set(["Aborted", "Aborting", "Clearing", "Cleared"]);

async function main() {
  const opts = options(process.argv);
  const server = new OPCUAServer({
    port: opts.port,
    hostname: "127.0.0.1",
    nodeset_filename: [nodesets.standard, nodesets.packML],
    serverCapabilities: { maxSessions: opts.maxSessions },
    // More connections than sessions, so that a client beyond the session limit is told
    // BadTooManySessions rather than refused at the socket.
    maxConnectionsPerEndpoint: opts.maxSessions + 10,
    securityModes: [MessageSecurityMode.None],
    securityPolicies: [SecurityPolicy.None],
    allowAnonymous: true,
  });
  await server.initialize();
  const addressSpace = server.engine.addressSpace;
  const namespace = addressSpace.registerNamespace(NAMESPACE);
  const packml = addressSpace.getNamespaceIndex(PACKML);
  const baseType = addressSpace.findObjectType("PackMLBaseObjectType", packml);
  const machine = baseType.instantiate({
    browseName: opts.machine,
    nodeId: `ns=${namespace.index};s=${opts.machine}`,
    namespace,
    organizedBy: addressSpace.rootFolder.objects,
    // Optional in OPC 30050; a machine that counts has them. CurrentState's Number is left out
    // (optional too): the state is read through its mandatory Id.
    optionals: ["Admin.ProdProcessedCount", "Admin.ProdDefectiveCount", "Admin.StopReason"],
  });
  const countType = addressSpace.findDataType("PackMLCountDataType", packml);
  const alarmType = addressSpace.findDataType("PackMLAlarmDataType", packml);
  const admin = machine.getComponentByName("Admin", packml);
  const processedNode = admin.getComponentByName("ProdProcessedCount", packml);
  const defectiveNode = admin.getComponentByName("ProdDefectiveCount", packml);
  const stopReasonNode = admin.getComponentByName("StopReason", packml);
  const base = machine.getComponentByName("BaseStateMachine", packml);
  const machineState = base.getComponentByName("MachineState", packml);
  const executeState = machineState.getComponentByName("ExecuteState", packml);

  const counts = { processed: opts.start, defective: 0, fraction: 0 };
  // Field names as node-opcua spells them: first letter lowered unless all capitals (ID).
  let stopReason = { ID: 0, value: 0, message: "", category: 0 };
  let state = "Execute";

  function countStructure(count) {
    return addressSpace.constructExtensionObject(countType, {
      ID: 1, name: "bottle 0.5 l", count, accCount: count,
      unit: { namespaceUri: "http://www.opcfoundation.org/UA/units/un/cefact",
              unitId: 4532560, displayName: { text: "PCE" }, description: { text: "piece" } },
    });
  }
  function publishCounts() {
    for (const [node, count] of [[processedNode, counts.processed],
                                 [defectiveNode, counts.defective]]) {
      node.setValueFromSource(new Variant({
        dataType: DataType.ExtensionObject, arrayType: 1 /* Array */, value: [countStructure(count)],
      }));
    }
  }
  function publishStopReason() {
    stopReasonNode.setValueFromSource(new Variant({
      dataType: DataType.ExtensionObject,
      value: addressSpace.constructExtensionObject(alarmType, {
        ...stopReason, dateTime: new Date(), ackDateTime: new Date(0), trigger: stopReason.ID !== 0,
      }),
    }));
  }
  function stateObject(machineNode, name) {
    return machineNode.typeDefinitionObj.getComponentByName(name, packml);
  }
  function setCurrent(machineNode, name) {
    const current = machineNode.getComponentByName("CurrentState");
    if (name === null) {  // a state machine that is not active: no current state
      current.setValueFromSource(new Variant({ dataType: DataType.LocalizedText,
                                               value: new LocalizedText({}) }));
      current.getPropertyByName("Id").setValueFromSource(
        new Variant({ dataType: DataType.NodeId, value: NodeId.nullNodeId }));
      return;
    }
    const target = stateObject(machineNode, name);
    current.setValueFromSource(new Variant({ dataType: DataType.LocalizedText,
                                             value: new LocalizedText({ text: name }) }));
    current.getPropertyByName("Id").setValueFromSource(
      new Variant({ dataType: DataType.NodeId, value: target.nodeId }));
    const number = current.getPropertyByName("Number");
    if (number) {
      const stateNumber = target.getPropertyByName("StateNumber").readValue().value.value;
      number.setValueFromSource(new Variant({ dataType: DataType.UInt32, value: stateNumber }));
    }
  }
  function publishState() {
    if (BASE_STATES.has(state)) {
      setCurrent(base, state); setCurrent(machineState, null); setCurrent(executeState, null);
    } else if (MACHINE_STATES.has(state)) {
      setCurrent(base, "Cleared"); setCurrent(machineState, state); setCurrent(executeState, null);
    } else {
      setCurrent(base, "Cleared"); setCurrent(machineState, "Running");
      setCurrent(executeState, state);
    }
  }

  publishCounts(); publishStopReason(); publishState();
  const tick = 0.1;
  const clock = setInterval(() => {
    if (state !== "Execute" || opts.rate <= 0) return;
    counts.fraction += opts.rate * tick;
    const whole = Math.floor(counts.fraction);
    if (whole > 0) {
      counts.fraction -= whole;
      counts.processed += whole;
      publishCounts();
    }
  }, tick * 1000);

  const lines = readline.createInterface({ input: process.stdin });
  lines.on("line", (line) => {
    const [command, ...rest] = line.trim().split(/\s+/);
    if (command === "state") {
      state = rest[0];
      const [id, ...message] = rest.slice(1);
      stopReason = { ID: Number(id || 0), value: 0, message: message.join(" "), category: 0 };
      publishStopReason(); publishState();
    } else if (command === "count") {
      counts.processed += Number(rest[0] || 0) + Number(rest[1] || 0);
      counts.defective += Number(rest[1] || 0);
      publishCounts();
    } else if (command === "sessions") {
      console.log(`sessions ${server.engine.currentSessionCount}`);
    }
  });

  await server.start();
  console.log(`packml-server listening on opc.tcp://127.0.0.1:${server.endpoints[0].port}`);
  const stop = async () => {
    clearInterval(clock);
    await server.shutdown(0);
    process.exit(0);
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((error) => { console.error(error); process.exit(1); });
