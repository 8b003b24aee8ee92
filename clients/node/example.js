'use strict';
// A fleet-events client in Node.js (grpc-js): TLS with the server's CA pinned, a bearer token,
// and each EventService call once. It prints one line per step and exits 1 at the first surprise.
//
//   node example.js --server 127.0.0.1:50051 --ca fleet-events-data/ca.pem --token "$(cat fleet-events-data/admin.token)"
//
// or set FLEET_EVENTS_SERVER, FLEET_EVENTS_CA and FLEET_EVENTS_TOKEN. The service definitions are
// loaded from ../../proto at run time by @grpc/proto-loader; the error details are decoded with
// protobufjs from the two google.rpc files in ./proto.

const fs = require('node:fs');
const path = require('node:path');
const { once } = require('node:events');
const { parseArgs, promisify } = require('node:util');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const EVENT_TYPE = 'EXAMPLE_DISK_CLONED';
const STREAM_EVENTS = 5;
const TIMEOUT_MS = 10_000;

class Failure extends Error {}

// The contract, with field names as in the .proto and enums as their names.
const fleet = grpc.loadPackageDefinition(
  protoLoader.loadSync('fleetevents/v1/fleetevents.proto', {
    includeDirs: [path.join(__dirname, '..', '..', 'proto')],
    keepCase: true, longs: String, enums: String, defaults: true,
  }),
).fleetevents.v1;

// google.rpc.Status and its detail messages, to read the grpc-status-details-bin trailer.
const rpc = new protobuf.Root().loadSync([
  path.join(__dirname, 'proto', 'google', 'rpc', 'status.proto'),
  path.join(__dirname, 'proto', 'google', 'rpc', 'error_details.proto'),
], { keepCase: true });

/** The google.rpc details of a failed call, by type name (e.g. 'google.rpc.BadRequest'). */
function errorDetails(err) {
  const [bin] = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (!bin) return {};
  const status = rpc.lookupType('google.rpc.Status').decode(bin);
  const details = {};
  for (const any of status.details) {
    const name = any.type_url.slice(any.type_url.lastIndexOf('/') + 1);
    details[name] = rpc.lookupType(name).decode(any.value);
  }
  return details;
}

const deadline = () => ({ deadline: Date.now() + TIMEOUT_MS });

async function main() {
  const { values: args } = parseArgs({
    options: {
      server: { type: 'string', default: process.env.FLEET_EVENTS_SERVER || '127.0.0.1:50051' },
      ca: { type: 'string', default: process.env.FLEET_EVENTS_CA || 'fleet-events-data/ca.pem' },
      token: { type: 'string', default: process.env.FLEET_EVENTS_TOKEN || '' },
    },
  });
  if (!args.token) throw new Failure('connect: no token (--token or FLEET_EVENTS_TOKEN)');
  const addr = args.server.replace(/^https:\/\//, ''); // the CLI's form is accepted too

  // 1. TLS that trusts only the server's own CA, plus the bearer token on every call.
  const creds = grpc.credentials.combineChannelCredentials(
    grpc.credentials.createSsl(fs.readFileSync(args.ca)),
    grpc.credentials.createFromMetadataGenerator((_params, callback) => {
      const md = new grpc.Metadata();
      md.set('authorization', `Bearer ${args.token}`);
      callback(null, md);
    }),
  );
  const events = new fleet.EventService(addr, creds);
  const access = new fleet.AccessService(addr, creds);
  const catalog = new fleet.CatalogService(addr, creds);
  const unary = (client, method) => promisify(client[method].bind(client));
  const classify = (ev) => unary(events, 'Classify')(ev, deadline());

  try {
    const me = await unary(access, 'WhoAmI')({}, deadline());
    console.log(`connect server=${addr} kind=${me.kind} name=${me.name} role=${me.role}`);

    // The application's own event type (clients may not send the server's KLSRV_* types).
    let result = 'created';
    try {
      await unary(catalog, 'RegisterEventType')({
        event_type: EVENT_TYPE,
        severity: 'SEVERITY_WARNING',
        display_name: 'Disk cloned (example)',
        application: 'fleet-events examples',
      }, deadline());
    } catch (err) {
      if (err.code !== grpc.status.ALREADY_EXISTS) throw err;
      result = 'exists';
    }
    console.log(`register event_type=${EVENT_TYPE} result=${result}`);

    // A device of our own, so that the query below counts only this run's events.
    const device = `example-node-${process.hrtime.bigint()}`;
    const event = (eventId) => ({
      event_id: eventId, device_id: device, event_type: EVENT_TYPE, params: { fingerprint: 'hw-42' },
    });

    // 2. Unary Classify.
    const c = await classify(event('classify-1'));
    if (c.outcome !== 'OUTCOME_STORED') throw new Failure(`classify: outcome ${c.outcome}, want OUTCOME_STORED`);
    console.log(`classify event_id=${c.event_id} outcome=${c.outcome} severity=${c.severity} display_name="${c.display_name}"`);

    // 3. Bidi Stream: exactly one answer per event, in order.
    const sent = Array.from({ length: STREAM_EVENTS }, (_, i) => event(`stream-${i + 1}`));
    const stream = events.Stream(deadline());
    for (const ev of sent) stream.write(ev);
    stream.end();
    const answers = [];
    for await (const answer of stream) answers.push(answer);
    if (answers.length !== sent.length) throw new Failure(`stream: ${answers.length} answers to ${sent.length} events`);
    answers.forEach((answer, i) => {
      if (answer.event_id !== sent[i].event_id) {
        throw new Failure(`stream: answer ${i + 1} is for ${answer.event_id}, want ${sent[i].event_id}`);
      }
    });
    const stored = answers.filter((a) => a.outcome === 'OUTCOME_STORED').length;
    console.log(`stream sent=${sent.length} received=${answers.length} in_order=true stored=${stored}`);

    // 4. A resend of an event already taken (same device_id and event_id).
    const dup = await classify(sent[0]);
    if (dup.outcome !== 'OUTCOME_DUPLICATE') throw new Failure(`duplicate: outcome ${dup.outcome}, want OUTCOME_DUPLICATE`);
    console.log(`duplicate event_id=${dup.event_id} outcome=${dup.outcome}`);

    // 5. Subscribe: registered once the response headers arrive; then one more event.
    const sub = events.Subscribe({ device_ids: [device] }, deadline());
    const firstEvent = new Promise((resolve, reject) => {
      sub.once('data', resolve);
      sub.once('error', reject);
    });
    await once(sub, 'metadata');
    await classify(event('live-1'));
    const live = await firstEvent;
    sub.on('error', () => {}); // CANCELLED, by the next line
    sub.cancel();
    if (live.event_id !== 'live-1') throw new Failure(`subscribe: received ${live.event_id}, want live-1`);
    console.log(`subscribe event_id=${live.event_id} received=true`);

    // 6. QueryEvents, two per page, following next_page_token to the end.
    const query = { device_id: device, page_size: 2, page_token: '' };
    let count = 0;
    let pages = 0;
    do {
      const page = await unary(events, 'QueryEvents')(query, deadline());
      count += page.events.length;
      pages += 1;
      query.page_token = page.next_page_token;
    } while (query.page_token);
    if (count !== 1 + STREAM_EVENTS + 1) throw new Failure(`query: ${count} events, want ${1 + STREAM_EVENTS + 1}`);
    console.log(`query page_size=2 pages=${pages} count=${count}`);

    // 7. A bad event: INVALID_ARGUMENT with google.rpc details (grpc-status-details-bin).
    let refusal;
    try {
      await classify({ ...event('bad-1'), device_id: '' });
    } catch (err) {
      refusal = err;
    }
    if (!refusal || refusal.code !== grpc.status.INVALID_ARGUMENT) {
      throw new Failure(`invalid: got ${refusal ? refusal.message : 'an answer'}, want INVALID_ARGUMENT`);
    }
    const details = errorDetails(refusal);
    const badRequest = details['google.rpc.BadRequest'];
    const info = details['google.rpc.ErrorInfo'];
    const field = badRequest ? badRequest.field_violations.map((v) => v.field).join(',') : '';
    const { reason = '', domain = '' } = info || {};
    if (field !== 'device_id' || reason !== 'INVALID_FIELD' || domain !== 'fleet-events') {
      throw new Failure(`invalid: details field=${field} reason=${reason} domain=${domain} (${refusal.details})`);
    }
    const code = Object.keys(grpc.status).find((k) => grpc.status[k] === refusal.code);
    console.log(`invalid code=${code} field=${field} reason=${reason} domain=${domain}`);
    console.log('done');
  } finally {
    events.close();
    access.close();
    catalog.close();
  }
}

main().catch((err) => {
  if (err instanceof Failure) {
    console.error(`FAIL ${err.message}`);
  } else if (err.code !== undefined && err.metadata) { // a gRPC status
    const code = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code);
    console.error(`FAIL ${code}: ${err.details}`);
  } else {
    console.error(`FAIL ${err.stack || err}`);
  }
  process.exitCode = 1;
});
