// A real @grpc/grpc-js client (Node's HTTP/2, not grpcio's C core) for the sidecar's tests.
// Usage: node grpcclient.js TARGET KIND METHOD MESSAGE [XID] [DEADLINE_MS]
//   KIND unary | stream (server streaming). Raw bytes both ways: no generated code.
// Prints one JSON line: {code, details, replies, headers, trailers}.
'use strict';
const grpc = require('@grpc/grpc-js');

const [target, kind, method, message, xid, deadlineMs] = process.argv.slice(2);
const identity = (b) => b;
const client = new grpc.Client(target, grpc.credentials.createInsecure());
const metadata = new grpc.Metadata();
if (xid) metadata.set('xid', xid);

const result = { code: null, details: null, replies: [], headers: {}, trailers: {} };
const plain = (md) => Object.fromEntries(
  Object.entries(md.getMap()).map(([k, v]) => [k, Buffer.isBuffer(v) ? v.toString('base64') : v]),
);
const finish = (status) => {
  result.code = status.code;
  result.details = status.details;
  result.trailers = plain(status.metadata);
  process.stdout.write(JSON.stringify(result) + '\n');
  client.close();
};

// connect first, so that a deadline given counts from the call, not from the connection
client.waitForReady(Date.now() + 10000, (error) => {
  if (error) {
    finish({ code: -1, details: 'not connected: ' + error.message, metadata: new grpc.Metadata() });
    return;
  }
  start(deadlineMs ? { deadline: Date.now() + Number(deadlineMs) } : {});
});

function start(options) {
  let call;
  if (kind === 'unary') {
    call = client.makeUnaryRequest(method, identity, identity, Buffer.from(message), metadata,
      options, (err, reply) => { if (!err) result.replies.push(reply.toString()); });
  } else if (kind === 'stream') {
    call = client.makeServerStreamRequest(method, identity, identity, Buffer.from(message),
      metadata, options);
    call.on('data', (reply) => result.replies.push(reply.toString()));
    call.on('error', () => {});
  } else {
    process.stderr.write('unknown kind ' + kind + '\n');
    process.exit(2);
  }
  call.on('metadata', (md) => { result.headers = plain(md); });
  call.on('status', finish);
}
