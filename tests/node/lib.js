'use strict';
// Shared helpers of the grpc-js tests: start the real fleet-events binary on a free port (as
// tests/python/conftest.py does), connect with its CA and admin token, hold the store's write
// lock, stop the server with SIGTERM.
//
// The binary is FLEET_EVENTS_BIN, default <repo>/target/release/fleet-events.

const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { performance } = require('node:perf_hooks');
const { setTimeout: sleep } = require('node:timers/promises');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const REPO = path.resolve(__dirname, '..', '..');
const PROTO_DIR = path.join(REPO, 'proto');
const PROTO_FILE = 'fleetevents/v1/fleetevents.proto';
const READY_DEADLINE_MS = 30_000;
const STOP_DEADLINE_MS = 15_000;
const POLL_MS = 20;
const RPC_TIMEOUT_MS = 10_000;
const DB_FILE = 'events.sqlite3';

const now = () => performance.now();

function serverBinary() {
  return process.env.FLEET_EVENTS_BIN || path.join(REPO, 'target', 'release', 'fleet-events');
}

const LOADER_OPTIONS = { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true };

// grpc.health.v1 is not in the repo's proto dir: its two messages and one method, as JSON.
const HEALTH_JSON = {
  nested: { grpc: { nested: { health: { nested: { v1: { nested: {
    HealthCheckRequest: { fields: { service: { type: 'string', id: 1 } } },
    HealthCheckResponse: {
      fields: { status: { type: 'ServingStatus', id: 1 } },
      nested: {
        ServingStatus: { values: { UNKNOWN: 0, SERVING: 1, NOT_SERVING: 2, SERVICE_UNKNOWN: 3 } },
      },
    },
    Health: {
      methods: { Check: { requestType: 'HealthCheckRequest', responseType: 'HealthCheckResponse' } },
    },
  } } } } } } },
};

let cached;
function protos() {
  if (!cached) {
    const fleetDef = protoLoader.loadSync(PROTO_FILE, { ...LOADER_OPTIONS, includeDirs: [PROTO_DIR] });
    const healthDef = protoLoader.fromJSON(HEALTH_JSON, LOADER_OPTIONS);
    cached = {
      fleetDef,
      fleet: grpc.loadPackageDefinition(fleetDef).fleetevents.v1,
      health: grpc.loadPackageDefinition(healthDef).grpc.health.v1,
    };
  }
  return cached;
}

function hermeticEnv() {
  // FLEET_EVENTS_* of the caller (e.g. FLEET_EVENTS_BIN) would be read as config overrides.
  const env = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (!k.startsWith('FLEET_EVENTS_')) env[k] = v;
  }
  return env;
}

/** Connects to a started server: one channel shared by every stub (one HTTP/2 connection). */
function connect(srv, channelOptions = {}) {
  const { fleet, health } = protos();
  const creds = grpc.credentials.combineChannelCredentials(
    grpc.credentials.createSsl(srv.caPem),
    grpc.credentials.createFromMetadataGenerator((_params, cb) => {
      const md = new grpc.Metadata();
      md.set('authorization', `Bearer ${srv.token}`);
      cb(null, md);
    }),
  );
  const options = {
    'grpc.max_receive_message_length': 64 * 1024 * 1024,
    // The server's certificate names localhost (and 127.0.0.1); an IP address as TLS SNI is
    // not allowed (Node and rustls warn), so verify and send SNI as localhost.
    'grpc.ssl_target_name_override': 'localhost',
    ...channelOptions,
  };
  const channel = new grpc.Channel(srv.address, creds, options);
  const opts = { channelOverride: channel };
  const c = {
    channel,
    events: new fleet.EventService(srv.address, creds, opts),
    catalog: new fleet.CatalogService(srv.address, creds, opts),
    health: new health.Health(srv.address, creds, opts),
    close() {
      channel.close();
    },
  };
  return c;
}

/** A unary call as a promise, with a deadline. */
function unary(client, method, req, timeoutMs = RPC_TIMEOUT_MS, extra = {}) {
  return new Promise((resolve, reject) => {
    client[method](req, { deadline: Date.now() + timeoutMs, ...extra }, (err, resp) => {
      if (err) reject(err);
      else resolve(resp);
    });
  });
}

class FleetServer {
  constructor(configText) {
    this.workdir = fs.mkdtempSync(path.join(os.tmpdir(), 'fleet-events-node-'));
    this.dataDir = path.join(this.workdir, 'data');
    fs.mkdirSync(this.dataDir);
    this.readyFile = path.join(this.workdir, 'ready');
    this.configPath = path.join(this.workdir, 'config.toml');
    fs.writeFileSync(this.configPath, configText);
    this.stderrPath = path.join(this.workdir, 'stderr.log');
    this.proc = null;
    this.exit = null;
  }

  get dbPath() {
    return path.join(this.dataDir, DB_FILE);
  }

  stderrText(limit = 20_000) {
    try {
      const t = fs.readFileSync(this.stderrPath, 'utf8');
      return t.slice(-limit);
    } catch {
      return '<no stderr>';
    }
  }

  async start() {
    const bin = serverBinary();
    assert.ok(fs.existsSync(bin), `server binary ${bin} does not exist (set FLEET_EVENTS_BIN)`);
    const args = ['serve', '--listen', '127.0.0.1:0', '--data-dir', this.dataDir,
      '--ready-file', this.readyFile, '--config', this.configPath];
    const err = fs.openSync(this.stderrPath, 'w');
    const out = fs.openSync(path.join(this.workdir, 'stdout.log'), 'w');
    this.proc = spawn(bin, args, { stdio: ['ignore', out, err], env: { ...hermeticEnv(), RUST_BACKTRACE: '1' } });
    fs.closeSync(err);
    fs.closeSync(out);
    this.exit = new Promise((resolve) => this.proc.once('exit', (code, signal) => resolve({ code, signal })));
    let exited = null;
    this.exit.then((e) => { exited = e; });

    const deadline = Date.now() + READY_DEADLINE_MS;
    for (;;) {
      if (exited) {
        throw new Error(`fleet-events exited (${JSON.stringify(exited)}) before it was ready\n${this.stderrText()}`);
      }
      if (fs.existsSync(this.readyFile)) {
        const text = fs.readFileSync(this.readyFile, 'utf8').trim();
        if (/^\S+:\d+$/.test(text)) {
          this.address = text;
          break;
        }
      }
      if (Date.now() >= deadline) {
        this.proc.kill('SIGKILL');
        throw new Error(`fleet-events wrote no address into ${this.readyFile} within ${READY_DEADLINE_MS} ms\n${this.stderrText()}`);
      }
      await sleep(POLL_MS);
    }
    this.caPem = fs.readFileSync(path.join(this.dataDir, 'ca.pem'));
    this.token = fs.readFileSync(path.join(this.dataDir, 'admin.token'), 'utf8').trim();
    assert.match(this.token, /^fet_\S+$/);

    // Health SERVING, waiting for the connection up to the same deadline.
    const c = connect(this);
    try {
      const resp = await unary(c.health, 'Check', { service: '' }, Math.max(1000, deadline - Date.now()),
        { waitForReady: true });
      assert.equal(resp.status, 'SERVING', `health says ${resp.status}\n${this.stderrText()}`);
    } finally {
      c.close();
    }
    return this;
  }

  /** SIGTERM; asserts exit code 0 within 15 s; removes the temp dir. */
  async stop() {
    if (!this.proc) return;
    const proc = this.proc;
    this.proc = null;
    let result;
    if (proc.exitCode === null && proc.signalCode === null) {
      proc.kill('SIGTERM');
      const timer = sleep(STOP_DEADLINE_MS, 'timeout', { ref: false });
      result = await Promise.race([this.exit, timer]);
      if (result === 'timeout') {
        proc.kill('SIGKILL');
        await this.exit;
      }
    } else {
      result = await this.exit;
    }
    const stderr = this.stderrText();
    fs.rmSync(this.workdir, { recursive: true, force: true });
    assert.notEqual(result, 'timeout', `fleet-events did not exit within ${STOP_DEADLINE_MS} ms of SIGTERM\n${stderr}`);
    assert.deepEqual(result, { code: 0, signal: null }, `fleet-events exit after SIGTERM\n${stderr}`);
  }
}

async function startServer(configText) {
  const srv = new FleetServer(configText);
  try {
    await srv.start();
  } catch (e) {
    await srv.stop().catch(() => {});
    throw e;
  }
  return srv;
}

const LOCK_SCRIPT = `
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], timeout=10.0, isolation_level=None)
con.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
con.execute("ROLLBACK")
print("released", flush=True)
con.close()
`;

/**
 * Takes the SQLite write lock of the store (BEGIN IMMEDIATE, in a python3 child) and holds it
 * for holdSecs. Returns { acquired, released } promises of the times (performance.now()).
 */
function holdWriteLock(dbPath, holdSecs) {
  const python = process.env.PYTHON || 'python3';
  const child = spawn(python, ['-c', LOCK_SCRIPT, dbPath, String(holdSecs)], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d) => { stderr += d; });
  let onLocked; let onReleased; let onFail;
  const acquired = new Promise((res, rej) => { onLocked = res; onFail = rej; });
  const released = new Promise((res, rej) => {
    onReleased = res;
    const prev = onFail;
    onFail = (e) => { prev(e); rej(e); };
  });
  acquired.catch(() => {});
  released.catch(() => {});
  let buf = '';
  child.stdout.on('data', (d) => {
    buf += d;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i).trim();
      buf = buf.slice(i + 1);
      if (line === 'locked') onLocked(now());
      if (line === 'released') onReleased(now());
    }
  });
  child.on('exit', (code) => {
    if (code !== 0) onFail(new Error(`write-lock helper exited ${code}: ${stderr}`));
  });
  child.on('error', (e) => onFail(e));
  return { acquired, released, child };
}

module.exports = {
  grpc, REPO, RPC_TIMEOUT_MS, DB_FILE, now, protos, connect, unary, startServer, holdWriteLock,
};
