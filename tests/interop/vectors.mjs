// Prints byte vectors made by the real yjs / y-protocols / lib0, as JSON of
// hex strings: the fixtures of tests/unit/test_yproto.py come from here.
// Deterministic: fixed client ids, no clock-dependent fields.
//   node tests/interop/vectors.mjs
import * as Y from 'yjs'
import * as encoding from 'lib0/encoding'
import * as syncProtocol from 'y-protocols/sync'
import * as awarenessProtocol from 'y-protocols/awareness'
import * as authProtocol from 'y-protocols/auth'

const hex = (bytes) => Buffer.from(bytes).toString('hex')
const frame = (write) => {
  const encoder = encoding.createEncoder()
  write(encoder)
  return encoding.toUint8Array(encoder)
}

const doc = new Y.Doc()
doc.clientID = 1234567
doc.getText('t').insert(0, 'héllo')
doc.getMap('m').set('k', 1)

const awareness = new awarenessProtocol.Awareness(doc)
awareness.setLocalState({ user: { name: 'Dr. Ada', color: '#30bced' }, cursor: { index: 3 } })
const live = awarenessProtocol.encodeAwarenessUpdate(awareness, [doc.clientID])
awareness.setLocalState(null)
const removed = awarenessProtocol.encodeAwarenessUpdate(awareness, [doc.clientID])
awareness.destroy()

const bigDoc = new Y.Doc()
bigDoc.clientID = 2 ** 32 + 5 // a client id beyond 32 bits
const bigAwareness = new awarenessProtocol.Awareness(bigDoc)
const bigClientUpdate = awarenessProtocol.encodeAwarenessUpdate(bigAwareness, [bigDoc.clientID])
bigAwareness.destroy()

const out = {
  state_vector: hex(Y.encodeStateVector(doc)),
  update_v1: hex(Y.encodeStateAsUpdate(doc)),
  sync_step1_frame: hex(frame((e) => { encoding.writeVarUint(e, 0); syncProtocol.writeSyncStep1(e, doc) })),
  sync_step2_frame: hex(frame((e) => { encoding.writeVarUint(e, 0); syncProtocol.writeSyncStep2(e, doc) })),
  sync_update_frame: hex(frame((e) => { encoding.writeVarUint(e, 0); syncProtocol.writeUpdate(e, Y.encodeStateAsUpdate(doc)) })),
  awareness_live: hex(live),
  awareness_removed: hex(removed),
  awareness_big_client: hex(bigClientUpdate),
  awareness_frame: hex(frame((e) => { encoding.writeVarUint(e, 1); encoding.writeVarUint8Array(e, live) })),
  query_awareness_frame: hex(frame((e) => { encoding.writeVarUint(e, 3) })),
  permission_denied_frame: hex(frame((e) => { encoding.writeVarUint(e, 2); authProtocol.writePermissionDenied(e, 'no access') })),
  varuints: [0, 127, 128, 300, 2 ** 32, 2 ** 53 - 1].map((n) => [n, hex(frame((e) => encoding.writeVarUint(e, n)))]),
  var_string: hex(frame((e) => encoding.writeVarString(e, 'Zoë 🩺')))
}
console.log(JSON.stringify(out, null, 2))
