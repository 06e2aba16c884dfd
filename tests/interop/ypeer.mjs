#!/usr/bin/env node
// A stock Y.js client that stays up and takes commands: y-websocket's
// WebsocketProvider (with `ws` as its WebSocket), driven one JSON line at a
// time on stdin, answering one JSON line per command on stdout. For tests
// that keep a client connected through a fault (a shard killed, a link cut)
// and look at it afterwards. Nothing here speaks the protocol by hand.
//
//   node ypeer.mjs --url ws://127.0.0.1:8765/yjs --room document:1 --token JWT
//
// Commands ({"id": any, "op": ...}; each answered with {"id", ...state}):
//   {"op":"append","name":"t","text":"abc"}   insert at the end of Text `name`
//   {"op":"awareness","state":{...}}          set the local awareness state
//   {"op":"disconnect"} / {"op":"connect"}    provider.disconnect() / connect()
//   {"op":"state"}                            just answer
// An answer: {"id", "text": {name: string}, "synced", "connected",
// "clientId", "awareness": [states of the other clients], "closes": [{code,reason}]}.
// It exits when stdin closes, so it cannot outlive the test that spawned it.

import * as Y from 'yjs'
import WebSocket from 'ws'
import { WebsocketProvider } from 'y-websocket'
import { createInterface } from 'node:readline'
import { parseArgs } from 'node:util'

const { values: args } = parseArgs({
  options: {
    url: { type: 'string' },
    room: { type: 'string' },
    token: { type: 'string' },
    text: { type: 'string', multiple: true, default: ['t'] }
  },
  strict: true
})
if (!args.url || !args.room) {
  process.stderr.write('usage: node ypeer.mjs --url ws://HOST:PORT/yjs --room RESOURCE [--token JWT]\n')
  process.exit(2)
}
console.warn = () => {}
console.error = () => {}

const doc = new Y.Doc()
const provider = new WebsocketProvider(args.url, args.room, doc, {
  params: args.token === undefined ? {} : { token: args.token },
  WebSocketPolyfill: WebSocket,
  disableBc: true,
  maxBackoffTime: 1000
})
const closes = []
let synced = false
provider.on('connection-close', (event) => {
  if (event) closes.push({ code: event.code, reason: String(event.reason || '') })
})
provider.on('sync', (state) => { synced = state })

function answer (id) {
  const text = {}
  for (const name of args.text) text[name] = doc.getText(name).toString()
  const awareness = []
  for (const [client, state] of provider.awareness.getStates()) {
    if (client !== doc.clientID) awareness.push(state)
  }
  process.stdout.write(JSON.stringify({
    id, text, synced, connected: provider.wsconnected, clientId: doc.clientID, awareness, closes
  }) + '\n')
}

const lines = createInterface({ input: process.stdin })
lines.on('line', (line) => {
  let command
  try {
    command = JSON.parse(line)
  } catch (e) {
    process.stdout.write(JSON.stringify({ error: `not JSON: ${e.message}` }) + '\n')
    return
  }
  switch (command.op) {
    case 'append': {
      const text = doc.getText(command.name || 't')
      text.insert(text.length, command.text)
      break
    }
    case 'awareness': provider.awareness.setLocalState(command.state); break
    case 'disconnect': provider.disconnect(); break
    case 'connect': provider.connect(); break
    case 'state': break
    default:
      process.stdout.write(JSON.stringify({ id: command.id, error: `unknown op ${command.op}` }) + '\n')
      return
  }
  answer(command.id)
})
lines.on('close', () => {
  provider.destroy()
  doc.destroy()
  setTimeout(() => process.exit(0), 100)
})
