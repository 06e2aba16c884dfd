// yclient.mjs against the stock reference server: what a test of our /yjs
// endpoint may rely on the client to do. Run with `npm test` in this folder
// (node --test); it starts refserver.mjs on a free loopback port and stops it.

import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { fileURLToPath } from 'node:url'
import { dirname, join } from 'node:path'

const here = dirname(fileURLToPath(import.meta.url))
let server
let url

before(async () => {
  server = spawn(process.execPath, [join(here, 'refserver.mjs'), '--port', '0', '--exit-with-stdin'],
    { stdio: ['pipe', 'pipe', 'inherit'] })
  const [line] = await once(server.stdout, 'data')
  url = JSON.parse(line.toString()).url + '/yjs'
})

after(async () => {
  if (server.exitCode === null) {
    const exited = once(server, 'exit')
    server.stdin.end() // --exit-with-stdin: the server stops by itself
    await exited
  }
})

// runs yclient.mjs; resolves with its exit code and its one JSON line
function yclient (...args) {
  const child = spawn(process.execPath, [join(here, 'yclient.mjs'), '--url', url, '--timeout-ms', '10000', ...args],
    { stdio: ['ignore', 'pipe', 'inherit'] })
  let stdout = ''
  child.stdout.on('data', (chunk) => { stdout += chunk })
  return once(child, 'exit').then(([code]) => ({ code, result: JSON.parse(stdout.trim().split('\n').pop()) }))
}

const edits = (who, text, n) => JSON.stringify([
  { op: 'text_insert', name: 't', index: 0, text },
  { op: 'map_set', name: 'm', key: who, value: { n } },
  { op: 'array_push', name: 'a', values: [n] },
  { op: 'awareness', state: { user: { name: who } } }
])

test('two clients converge on Text, Map and Array and see each other\'s awareness', async () => {
  const expect = (other) => JSON.stringify({
    map: { m: { alice: { n: 1 }, bob: { n: 2 } } },
    array: {},
    awareness: [{ user: { name: other } }]
  })
  const [a, b] = await Promise.all([
    yclient('--room', 'doc:converge', '--token', 'x', '--ops', edits('alice', 'abc', 1), '--expect', expect('bob'),
      '--linger-ms', '300'),
    yclient('--room', 'doc:converge', '--token', 'x', '--ops', edits('bob', 'xyz', 2), '--expect', expect('alice'),
      '--linger-ms', '300')
  ])
  assert.equal(a.code, 0, JSON.stringify(a.result))
  assert.equal(b.code, 0, JSON.stringify(b.result))
  assert.deepEqual(a.result.text, b.result.text)
  assert.deepEqual(a.result.map, b.result.map)
  assert.deepEqual(a.result.array, b.result.array)
  assert.equal(a.result.text.t.length, 6)
  assert.deepEqual([...a.result.array.a].sort(), [1, 2])
  assert.deepEqual(a.result.awarenessSeen, [{ user: { name: 'bob' } }])
  assert.deepEqual(b.result.awarenessSeen, [{ user: { name: 'alice' } }])
})

test('a late joiner gets the document and an expectation it meets ends the wait', async () => {
  const first = await yclient('--room', 'doc:late', '--ops', edits('carol', 'hello', 3))
  assert.equal(first.code, 0)
  const late = await yclient('--room', 'doc:late', '--expect', '{"text":{"t":"hello"},"array":{"a":[3]}}')
  assert.equal(late.code, 0, JSON.stringify(late.result))
  assert.deepEqual(late.result.map, {})
})

test('an expectation never met times out with an error line and a non-zero exit', async () => {
  const { code, result } = await yclient('--room', 'doc:never', '--expect', '{"text":{"t":"never"}}',
    '--timeout-ms', '500')
  assert.equal(code, 1)
  assert.equal(result.error, 'timeout')
  assert.equal(result.synced, true)
})

test('raw bytes and a V2 update are sent after sync (the stock server ignores both)', async () => {
  const raw = await yclient('--room', 'doc:raw', '--raw-hex', '0402', '--after-ms', '200')
  assert.equal(raw.code, 0)
  assert.equal(raw.result.connected, true)
  const v2 = await yclient('--room', 'doc:raw', '--v2-update', '--after-ms', '200', '--text', 'v2')
  assert.equal(v2.code, 0)
  assert.equal(v2.result.text.v2, '')
})

test('a server that is not there fails fast with exit code 3', async () => {
  const saved = url
  url = 'ws://127.0.0.1:1/yjs'
  try {
    const { code, result } = await yclient('--room', 'doc:none')
    assert.equal(code, 3)
    assert.equal(result.error, 'closed')
    assert.equal(result.synced, false)
  } finally {
    url = saved
  }
})
