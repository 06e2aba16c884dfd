#!/usr/bin/env node
// A stock Y.js client on the command line: y-websocket's WebsocketProvider
// (with `ws` as its WebSocket) connects to a y-websocket server, waits for
// `sync`, runs a script of edits, optionally waits until the document holds
// what is expected, prints one JSON line and exits. Nothing here speaks the
// protocol by hand except the two bad-input ops (raw_hex, v2_update), which
// exist to check that a server refuses what stock clients never send.
//
//   node yclient.mjs --url ws://127.0.0.1:8765/yjs --room document:1 --token JWT \
//        --ops '[{"op":"text_insert","name":"t","index":0,"text":"abc"}]' \
//        --expect '{"text":{"t":"abc"}}'
//
// See README.md in this folder for every flag, op and the output.

import * as Y from 'yjs'
import WebSocket from 'ws'
import { WebsocketProvider, messageAuth, messageSync } from 'y-websocket'
import * as encoding from 'lib0/encoding'
import * as decoding from 'lib0/decoding'
import * as syncProtocol from 'y-protocols/sync'
import * as authProtocol from 'y-protocols/auth'
import { readFileSync } from 'node:fs'
import { parseArgs } from 'node:util'

const EXIT_ERROR = 1 // timeout, expectation not met, unexpected exception
const EXIT_USAGE = 2
const EXIT_CLOSED = 3 // the server refused or closed the connection before sync

const USAGE = `usage: node yclient.mjs --url ws://HOST:PORT/yjs --room RESOURCE [--token JWT]
  [--ops JSON | --ops -] [--expect JSON] [--text NAME]... [--map NAME]... [--array NAME]...
  [--raw-hex HEX] [--v2-update] [--after-ms MS] [--linger-ms MS] [--timeout-ms MS]
  [--retry] [--quiet]`

const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')

function usage (message) {
  out({ error: 'usage', message })
  process.stderr.write(USAGE + '\n')
  process.exit(EXIT_USAGE)
}

function parseJson (flag, text) {
  try {
    return JSON.parse(text)
  } catch (e) {
    usage(`${flag} is not JSON: ${e.message}`)
  }
}

let args
try {
  args = parseArgs({
    options: {
      url: { type: 'string' },
      room: { type: 'string' },
      token: { type: 'string' },
      ops: { type: 'string' },
      expect: { type: 'string' },
      text: { type: 'string', multiple: true, default: [] },
      map: { type: 'string', multiple: true, default: [] },
      array: { type: 'string', multiple: true, default: [] },
      'raw-hex': { type: 'string' },
      'v2-update': { type: 'boolean', default: false },
      'after-ms': { type: 'string', default: '500' },
      'linger-ms': { type: 'string', default: '0' },
      'timeout-ms': { type: 'string', default: '15000' },
      retry: { type: 'boolean', default: false },
      quiet: { type: 'boolean', default: false },
      help: { type: 'boolean', default: false }
    },
    strict: true
  }).values
} catch (e) {
  usage(e.message)
}
if (args.help) {
  process.stdout.write(USAGE + '\n')
  process.exit(0)
}
if (!args.url || !args.room) usage('--url and --room are required')
const ms = (flag) => {
  const n = Number(args[flag])
  if (!Number.isFinite(n) || n < 0) usage(`--${flag} must be a number of milliseconds`)
  return n
}
const timeoutMs = ms('timeout-ms')
const afterMs = ms('after-ms')
const lingerMs = ms('linger-ms')

const ops = args.ops === undefined
  ? []
  : parseJson('--ops', args.ops === '-' ? readFileSync(0, 'utf8') : args.ops)
if (!Array.isArray(ops)) usage('--ops must be a JSON array')
if (args['raw-hex'] !== undefined) ops.push({ op: 'raw_hex', hex: args['raw-hex'] })
if (args['v2-update']) ops.push({ op: 'v2_update' })
const expect = args.expect === undefined ? null : parseJson('--expect', args.expect)

if (args.quiet) {
  // the provider logs a permission-denied reason and unknown messages with
  // console.warn / console.error: keep stdout and stderr for our own lines
  console.warn = () => {}
  console.error = () => {}
}

// --- what to read back ------------------------------------------------------

// Remote shared types stay untyped until the local doc names them, so the
// kinds to print come from the flags, the ops and the expectation.
const names = { text: new Set(args.text), map: new Set(args.map), array: new Set(args.array) }
const KIND_OF_OP = {
  text_insert: 'text', text_delete: 'text',
  map_set: 'map', map_delete: 'map',
  array_push: 'array', array_insert: 'array', array_delete: 'array'
}
for (const op of ops) {
  if (KIND_OF_OP[op.op]) names[KIND_OF_OP[op.op]].add(op.name)
}
const addExpectNames = (exp) => {
  for (const kind of ['text', 'map', 'array']) {
    for (const name of Object.keys((exp && exp[kind]) || {})) names[kind].add(name)
  }
}
addExpectNames(expect)
for (const op of ops) if (op.op === 'wait_for') addExpectNames(op.expect)

const doc = new Y.Doc()
const params = args.token === undefined ? {} : { token: args.token }
const provider = new WebsocketProvider(args.url, args.room, doc, {
  params,
  WebSocketPolyfill: WebSocket,
  disableBc: true, // peers are other processes; no cross-tab channel
  connect: false
})

const permissionDenied = []
provider.messageHandlers[messageAuth] = (_encoder, decoder, prov) => {
  authProtocol.readAuthMessage(decoder, prov.doc, (_doc, reason) => permissionDenied.push(reason))
}

const closes = [] // {code, reason} of every close the server caused
const connectionErrors = []
const awarenessSeen = new Map() // client id -> last non-null state of another client
let synced = false

provider.on('connection-error', (event) => {
  connectionErrors.push(String((event && (event.message || event.error?.message)) || 'connection error'))
})
provider.on('connection-close', (event) => {
  if (event) closes.push({ code: event.code, reason: String(event.reason || '') })
  if (!synced && !args.retry) {
    finish(EXIT_CLOSED, { error: 'closed', message: 'connection closed before sync' })
  }
})
provider.awareness.on('change', () => {
  for (const [client, state] of provider.awareness.getStates()) {
    if (client !== doc.clientID) awarenessSeen.set(client, state)
  }
  wake()
})
doc.on('update', () => wake())

// --- reading and matching -----------------------------------------------------

function content () {
  const text = {}
  const map = {}
  const array = {}
  for (const name of names.text) text[name] = doc.getText(name).toString()
  for (const name of names.map) map[name] = doc.getMap(name).toJSON()
  for (const name of names.array) array[name] = doc.getArray(name).toJSON()
  const awareness = []
  for (const [client, state] of provider.awareness.getStates()) {
    if (client !== doc.clientID) awareness.push(state)
  }
  return { text, map, array, awareness, awarenessSeen: [...awarenessSeen.values()] }
}

const isObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v)
const deepEqual = (a, b) => JSON.stringify(a) === JSON.stringify(b) ||
  (isObject(a) && isObject(b) && Object.keys(a).length === Object.keys(b).length &&
   Object.keys(a).every((k) => deepEqual(a[k], b[k])))
// every key of `want` is in `got` with a matching value (objects recursively)
const subset = (want, got) => isObject(want)
  ? isObject(got) && Object.keys(want).every((k) => subset(want[k], got[k]))
  : deepEqual(want, got)

// text: equal; map: the given keys equal; array: equal;
// awareness: each given object is a subset of some other client's state (seen
// at any time since connecting, so a peer that already left still counts)
function matches (exp) {
  if (!exp) return true
  const now = content()
  for (const [name, want] of Object.entries(exp.text || {})) if (now.text[name] !== want) return false
  for (const [name, want] of Object.entries(exp.map || {})) if (!subset(want, now.map[name])) return false
  for (const [name, want] of Object.entries(exp.array || {})) if (!deepEqual(want, now.array[name])) return false
  for (const want of exp.awareness || []) {
    if (!now.awarenessSeen.some((state) => subset(want, state))) return false
  }
  return true
}

let waker = null
function wake () {
  if (waker) waker()
}
// resolves when `exp` holds (checked on every document or awareness change)
function until (exp) {
  return new Promise((resolve) => {
    const check = () => {
      if (matches(exp)) {
        waker = null
        resolve()
      }
    }
    waker = check
    check()
  })
}
const sleep = (n) => new Promise((resolve) => setTimeout(resolve, n))

// --- ops -------------------------------------------------------------------------

function sendRaw (bytes) {
  const ws = provider.ws
  if (!ws || ws.readyState !== WebSocket.OPEN) throw new Error('not connected')
  ws.send(bytes)
}

// A Y.js V2 update (which y-websocket never sends) in a sync update message.
function v2UpdateFrame (op) {
  const other = new Y.Doc()
  other.getText(op.name || 'v2').insert(0, op.text || 'v2 update')
  const encoder = encoding.createEncoder()
  encoding.writeVarUint(encoder, messageSync)
  syncProtocol.writeUpdate(encoder, Y.encodeStateAsUpdateV2(other))
  return encoding.toUint8Array(encoder)
}

async function run (op) {
  switch (op.op) {
    case 'text_insert': doc.getText(op.name).insert(op.index, op.text); break
    case 'text_delete': doc.getText(op.name).delete(op.index, op.length); break
    case 'map_set': doc.getMap(op.name).set(op.key, op.value); break
    case 'map_delete': doc.getMap(op.name).delete(op.key); break
    case 'array_push': doc.getArray(op.name).push(op.values); break
    case 'array_insert': doc.getArray(op.name).insert(op.index, op.values); break
    case 'array_delete': doc.getArray(op.name).delete(op.index, op.length); break
    case 'awareness': provider.awareness.setLocalState(op.state); break
    case 'wait_ms': await sleep(op.ms); break
    case 'wait_for': await until(op.expect); break
    case 'raw_hex': sendRaw(Buffer.from(op.hex, 'hex')); await sleep(afterMs); break
    case 'v2_update': sendRaw(v2UpdateFrame(op)); await sleep(afterMs); break
    default: throw new Error(`unknown op ${JSON.stringify(op.op)}`)
  }
}

// --- the run -----------------------------------------------------------------------

let finished = false
async function finish (code, extra) {
  if (finished) return
  finished = true
  clearTimeout(deadline)
  out({
    ...extra,
    synced,
    connected: provider.wsconnected,
    clientId: doc.clientID,
    ...content(),
    closes,
    connectionErrors,
    permissionDenied
  })
  // close politely (the server sees a close frame, not a reset), briefly
  const ws = provider.ws
  const closed = ws ? new Promise((resolve) => ws.once('close', resolve)) : Promise.resolve()
  provider.destroy()
  doc.destroy()
  await Promise.race([closed, sleep(500)])
  process.exit(code)
}

const deadline = setTimeout(() => {
  finish(EXIT_ERROR, { error: 'timeout', message: `not done within ${timeoutMs} ms` })
}, timeoutMs)

async function main () {
  await new Promise((resolve) => {
    provider.on('sync', (state) => { if (state) resolve() })
    provider.connect()
  })
  synced = true
  for (const op of ops) {
    if (finished) return
    await run(op)
  }
  await until(expect)
  if (lingerMs) await sleep(lingerMs)
  await finish(0, {})
}

main().catch((e) => finish(EXIT_ERROR, { error: 'exception', message: String(e && e.stack ? e.stack : e) }))
