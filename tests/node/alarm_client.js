// An independent OPC UA client stack for the Alarms and Conditions tests (node-opcua):
// builds an alarm list from ConditionRefresh and condition events on the Server object,
// then acknowledges one condition with a comment and waits for its acknowledged event.
//
// usage: node alarm_client.js URL USER PASSWORD PROBE ALARM_ID COMMENT
// prints one line 'REPORT {json}': {alarms, ackRequestedAt, ackStatus, unknownEventStatus,
// ackedEvent}
"use strict";

const {
  OPCUAClient,
  AttributeIds,
  ClientMonitoredItem,
  DataType,
  MessageSecurityMode,
  OPCUACertificateManager,
  SecurityPolicy,
  TimestampsToReturn,
  UserTokenType,
  constructEventFilter,
} = require("node-opcua");

const FIELDS = [
  "EventId",
  "EventType",
  "SourceName",
  "ConditionName",
  "Message",
  "Severity",
  "Retain",
  "ActiveState.Id",
  "AckedState.Id",
  "Comment",
  "ClientUserId",
  "ConditionId",
];
const REFRESH_START = "ns=0;i=2787";
const REFRESH_END = "ns=0;i=2788";

function plain(values) {
  const event = {};
  FIELDS.forEach((name, index) => {
    const value = values[index] ? values[index].value : null;
    if (value === null || value === undefined) {
      event[name] = null;
    } else if (Buffer.isBuffer(value)) {
      event[name] = value.toString("hex");
    } else if (value.text !== undefined) {
      event[name] = value.text;
    } else if (typeof value === "object" && value.toString && !Array.isArray(value)) {
      event[name] = value.toString();
    } else {
      event[name] = value;
    }
  });
  return event;
}

async function main() {
  const [url, user, password, probe, alarmId, comment] = process.argv.slice(2);
  // The client's own certificate store in the folder the test names (not the home folder).
  const pki = process.env.NODE_OPCUA_PKI;
  const client = OPCUAClient.create({
    clientCertificateManager: pki ? new OPCUACertificateManager({ rootFolder: pki }) : undefined,
    endpointMustExist: false,
    securityMode: MessageSecurityMode.None,
    securityPolicy: SecurityPolicy.None,
    connectionStrategy: { maxRetry: 2, initialDelay: 200, maxDelay: 1000 },
  });
  await client.connect(url);
  const session = await client.createSession({
    type: UserTokenType.UserName,
    userName: user,
    password: password,
  });
  const subscription = await session.createSubscription2({
    requestedPublishingInterval: 50,
    requestedLifetimeCount: 1000,
    requestedMaxKeepAliveCount: 20,
    maxNotificationsPerPublish: 1000,
    publishingEnabled: true,
    priority: 1,
  });
  const received = [];
  const waiters = [];
  const item = ClientMonitoredItem.create(
    subscription,
    { nodeId: "ns=0;i=2253", attributeId: AttributeIds.EventNotifier },
    { samplingInterval: 0, discardOldest: false, queueSize: 10000, filter: constructEventFilter(FIELDS) },
    TimestampsToReturn.Neither,
  );
  item.on("changed", (values) => {
    const event = plain(values);
    received.push(event);
    for (const waiter of waiters.slice()) {
      if (waiter.check(event)) {
        waiters.splice(waiters.indexOf(waiter), 1);
        waiter.resolve(event);
      }
    }
  });
  await new Promise((resolve) => item.once("initialized", resolve));

  function next(check, timeoutMs = 10000) {
    return new Promise((resolve, reject) => {
      const waiter = { check, resolve };
      waiters.push(waiter);
      setTimeout(() => reject(new Error("no matching event in time")), timeoutMs).unref();
    });
  }

  // The alarm list: whatever ConditionRefresh sends between RefreshStart and RefreshEnd.
  const alarms = {};
  let refreshing = false;
  const ended = next((event) => event.EventType === REFRESH_END);
  const listen = (event) => {
    if (event.EventType === REFRESH_START) refreshing = true;
    else if (event.EventType === REFRESH_END) refreshing = false;
    else if (refreshing) alarms[`${event.SourceName}/${event.ConditionName}`] = event;
  };
  item.on("changed", (values) => listen(plain(values)));
  const refresh = await session.call({
    objectId: "ns=0;i=2782",
    methodId: "ns=0;i=3875",
    inputArguments: [{ dataType: DataType.UInt32, value: subscription.subscriptionId }],
  });
  if (refresh.statusCode.name !== "Good") throw new Error(`ConditionRefresh: ${refresh.statusCode.name}`);
  await ended;

  const target = alarms[`${probe}/${alarmId}`];
  if (!target) throw new Error(`${probe}/${alarmId} is not in the alarm list`);
  const acked = next(
    (event) => event.ConditionId === target.ConditionId && event["AckedState.Id"] === true,
  );
  const ackRequestedAt = Date.now() / 1000;
  const answer = await session.call({
    objectId: target.ConditionId,
    methodId: "ns=0;i=9111",
    inputArguments: [
      { dataType: DataType.ByteString, value: Buffer.from(target.EventId, "hex") },
      { dataType: DataType.LocalizedText, value: { text: comment } },
    ],
  });
  const ackedEvent = answer.statusCode.name === "Good" ? await acked : null;
  const unknown = await session.call({
    objectId: target.ConditionId,
    methodId: "ns=0;i=9111",
    inputArguments: [
      { dataType: DataType.ByteString, value: Buffer.from("00", "hex") },
      { dataType: DataType.LocalizedText, value: { text: "wrong event" } },
    ],
  });
  await subscription.terminate();
  await session.close();
  await client.disconnect();
  // node-opcua logs on stdout too: the report is the line that starts with REPORT.
  process.stdout.write(
    "REPORT " +
    JSON.stringify({
      alarms: Object.values(alarms),
      ackRequestedAt,
      ackStatus: answer.statusCode.name,
      unknownEventStatus: unknown.statusCode.name,
      ackedEvent,
    }) + "\n",
  );
}

main().catch((error) => {
  process.stderr.write(`alarm_client failed: ${error.stack || error}\n`);
  process.exit(1);
});
