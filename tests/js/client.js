#!/usr/bin/env node
// A claypot client in Node.js: it speaks only the wire contract
// (proto/claypot.proto, loaded at run time) and JSON, never pickle.
//
//   node tests/js/client.js ADDRESS TOKEN ALIAS [options]
//
// Against the object ALIAS it runs, in order:
//   ping          Ping (needs no token; the backend's identity comes only with it)
//   resolve       Resolve ALIAS to its object id, class and owner backend
//   call          CallJson METHOD --method with --args / --kwargs
//   read          CallJson GET_ATTR --read
//   write         CallJson SET_ATTR --write = --value, then reads it back
//   remote_error  CallJson METHOD --method with --bad-args (user code raises)
//   wrong_token   Resolve with a wrong token: expects gRPC UNAUTHENTICATED
//   unknown_alias Resolve and CallJson on an alias no object has
// and prints one JSON object with every step's result on stdout.
// Options (defaults in DEFAULTS below): --method, --args, --kwargs, --read,
// --write, --value, --bad-args, --deadline (seconds per call).
// Exit status: 0 when every step ran, 1 on an unexpected failure, 2 on bad usage.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO = path.join(__dirname, '..', '..', 'proto', 'claypot.proto');
const TOKEN_HEADER = 'claypot-token';
const DEFAULTS = {
  method: 'record',
  args: '[2.5]',
  kwargs: '{"memo": "from node"}',
  read: 'entries',
  write: 'owner',
  value: '{"name": "node", "tags": ["js", "grpc"], "n": 3}',
  'bad-args': '["not a number"]',
  deadline: '10',
};

function usage(message) {
  process.stderr.write(`${message}\nusage: node client.js ADDRESS TOKEN ALIAS ` +
    `[--${Object.keys(DEFAULTS).join(' V] [--')} V]\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const positional = [];
  const options = { ...DEFAULTS };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i].startsWith('--')) {
      const key = argv[i].slice(2);
      if (!(key in DEFAULTS) || i + 1 >= argv.length) usage(`bad option ${argv[i]}`);
      options[key] = argv[++i];
    } else {
      positional.push(argv[i]);
    }
  }
  if (positional.length !== 3) usage('expected ADDRESS TOKEN ALIAS');
  for (const key of ['args', 'kwargs', 'value', 'bad-args']) {
    try {
      JSON.parse(options[key]);
    } catch (err) {
      usage(`--${key} is not JSON: ${err.message}`);
    }
  }
  const [address, token, alias] = positional;
  return { address, token, alias, options };
}

function loadService() {
  const definition = protoLoader.loadSync(PROTO, {
    keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).claypot.v1.Backend;
}

// One unary call as a promise. Resolves with the reply; rejects with the
// grpc-js error (its .code is a grpc.status value).
function unary(client, method, request, token, deadlineSeconds) {
  const metadata = new grpc.Metadata();
  if (token !== null) metadata.set(TOKEN_HEADER, token);
  const deadline = new Date(Date.now() + deadlineSeconds * 1000);
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline }, (err, reply) => {
      if (err) reject(err);
      else resolve(reply);
    });
  });
}

// CallJson, decoded: { result } on success, { error: {code, message, remote_type} }
// when the backend answered with an error.
async function callJson(client, token, deadline, request) {
  const reply = await unary(client, 'CallJson', request, token, deadline);
  if (reply.error && reply.error.code) {
    const { code, message, remote_type: remoteType } = reply.error;
    return { error: { code, message, remote_type: remoteType } };
  }
  return { result: reply.result_json === '' ? null : JSON.parse(reply.result_json) };
}

function grpcFailure(err) {
  const name = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code);
  return { grpc_code: err.code, grpc_status: name || String(err.code), details: err.details };
}

async function main() {
  const { address, token, alias, options } = parseArgs(process.argv.slice(2));
  const Backend = loadService();
  const client = new Backend(address, grpc.credentials.createInsecure());
  const deadline = Number(options.deadline);
  const out = { address };
  try {
    const ping = await unary(client, 'Ping', {}, token, deadline);
    out.ping = { backend_id: ping.backend_id, address: ping.address, pid: Number(ping.pid) };

    const resolved = await unary(client, 'Resolve', { alias }, token, deadline);
    if (resolved.error && resolved.error.code) {
      throw new Error(`Resolve(${alias}) failed: ${resolved.error.code}: ${resolved.error.message}`);
    }
    out.resolve = { ...resolved.ref };

    out.call = await callJson(client, token, deadline, {
      alias, kind: 'METHOD', name: options.method,
      args_json: options.args, kwargs_json: options.kwargs,
    });
    out.read = await callJson(client, token, deadline, {
      object_id: out.resolve.object_id, kind: 'GET_ATTR', name: options.read,
    });
    out.write = await callJson(client, token, deadline, {
      alias, kind: 'SET_ATTR', name: options.write, args_json: options.value,
    });
    out.read_back = await callJson(client, token, deadline, {
      alias, kind: 'GET_ATTR', name: options.write,
    });
    out.remote_error = await callJson(client, token, deadline, {
      alias, kind: 'METHOD', name: options.method, args_json: options['bad-args'],
    });

    try {
      await unary(client, 'Resolve', { alias }, `${token}-wrong`, deadline);
      out.wrong_token = { grpc_status: 'OK' };
    } catch (err) {
      out.wrong_token = grpcFailure(err);
    }

    const missing = `${alias}-no-such-alias-${process.pid}`;
    const resolveMissing = await unary(client, 'Resolve', { alias: missing }, token, deadline);
    out.unknown_alias = {
      alias: missing,
      resolve: resolveMissing.error ? { code: resolveMissing.error.code,
        message: resolveMissing.error.message } : { ref: resolveMissing.ref },
      call: await callJson(client, token, deadline, {
        alias: missing, kind: 'METHOD', name: options.method, args_json: options.args,
      }),
    };
  } catch (err) {
    out.failure = err.code !== undefined ? grpcFailure(err) : { message: String(err) };
    process.exitCode = 1;
  }
  process.stdout.write(`${JSON.stringify(out)}\n`);
  client.close();
}

main();
