'use strict';
// `npm pack` puts a copy of the repository's proto/claypot.proto inside the
// package (prepack) and removes it afterwards (postpack), so a checkout always
// loads the one contract and never a stale copy.
const fs = require('fs');
const path = require('path');

const source = path.join(__dirname, '..', '..', '..', 'proto', 'claypot.proto');
const target = path.join(__dirname, '..', 'proto', 'claypot.proto');

const action = process.argv[2];
if (action === 'copy') {
  fs.mkdirSync(path.dirname(target), { recursive: true });
  fs.copyFileSync(source, target);
} else if (action === 'clean') {
  fs.rmSync(path.dirname(target), { recursive: true, force: true });
} else {
  process.stderr.write('usage: node scripts/proto.js copy|clean\n');
  process.exit(2);
}
