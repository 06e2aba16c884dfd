#!/usr/bin/env node
// The stock reference y-websocket server (@y/websocket-server's
// setupWSConnection, as its own bin runs it) on a loopback port, for the
// interop tests and the benchmark to run beside ours. What differs from
// `npx y-websocket-server`: the port may be 0 (the kernel picks one), the
// ready line is JSON with the port, only loopback hosts are allowed, and
// `--exit-with-stdin` ends the server when its parent goes away, so no test
// leaves one behind.
//
//   node refserver.mjs [--host 127.0.0.1] [--port 0] [--exit-with-stdin]
//   -> {"ready":true,"url":"ws://127.0.0.1:40123","port":40123,"pid":4242}
//
// Clients connect to ws://HOST:PORT/ANY/PATH/ROOM: the stock server names the
// document by the whole path (the token in the query string is ignored).

import http from 'node:http'
import { parseArgs } from 'node:util'
import { WebSocketServer } from 'ws'
import { setupWSConnection } from '@y/websocket-server/utils'

const LOOPBACK = new Set(['127.0.0.1', 'localhost', '::1'])

let args
try {
  args = parseArgs({
    options: {
      host: { type: 'string', default: '127.0.0.1' },
      port: { type: 'string', default: '0' },
      'exit-with-stdin': { type: 'boolean', default: false }
    },
    strict: true
  }).values
} catch (e) {
  process.stderr.write(`${e.message}\nusage: node refserver.mjs [--host 127.0.0.1] [--port 0] [--exit-with-stdin]\n`)
  process.exit(2)
}
const port = Number(args.port)
if (!LOOPBACK.has(args.host) || !Number.isInteger(port) || port < 0 || port > 65535) {
  process.stderr.write('refserver: --host must be a loopback address and --port 0..65535\n')
  process.exit(2)
}

const wss = new WebSocketServer({ noServer: true })
wss.on('connection', setupWSConnection)

const server = http.createServer((_request, response) => {
  response.writeHead(200, { 'Content-Type': 'text/plain' })
  response.end('okay')
})
server.on('upgrade', (request, socket, head) => {
  wss.handleUpgrade(request, socket, head, (ws) => wss.emit('connection', ws, request))
})

let stopping = false
function stop (code) {
  if (stopping) return
  stopping = true
  for (const ws of wss.clients) ws.terminate()
  server.close(() => process.exit(code))
  setTimeout(() => process.exit(code), 1000).unref()
}
process.on('SIGTERM', () => stop(0))
process.on('SIGINT', () => stop(0))
if (args['exit-with-stdin']) {
  process.stdin.on('end', () => stop(0))
  process.stdin.on('error', () => stop(0))
  process.stdin.resume()
}

server.on('error', (e) => {
  process.stderr.write(`refserver: ${e.message}\n`)
  process.exit(1)
})
server.listen(port, args.host, () => {
  const actual = server.address().port
  const host = args.host === '::1' ? '[::1]' : args.host
  process.stdout.write(JSON.stringify({ ready: true, url: `ws://${host}:${actual}`, port: actual, pid: process.pid }) + '\n')
})
