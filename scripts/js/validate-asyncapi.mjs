// Validates an AsyncAPI document with the AsyncAPI Initiative's own parser (@asyncapi/parser,
// which checks the document against the AsyncAPI 3 JSON Schema and its spectral rules), then
// checks every message example against its message's payload and headers schemas, and finally
// checks real messages (a JSON file of [{"message": name, "headers": {...}, "payload": {...}}],
// as a consumer received them) the same way.
//
//   node scripts/js/validate-asyncapi.mjs docs/asyncapi.yaml [messages.json]
//
// The packages come from KCI_TEST_JS_TOOLS (default ~/.cache/kci-receiver/js), where
// scripts/test installs them from this folder's package-lock.json. Exit 0: valid; 1: not valid.
import { createRequire } from 'node:module';
import { readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';

const tools = process.env.KCI_TEST_JS_TOOLS || join(homedir(), '.cache/kci-receiver/js');
const require = createRequire(join(tools, 'package.json'));
const { Parser, fromFile } = require('@asyncapi/parser');
const Ajv = require('ajv').default;
const addFormats = require('ajv-formats').default;

const [documentPath, messagesPath] = process.argv.slice(2);
if (!documentPath) {
  console.error('usage: validate.mjs <asyncapi.yaml> [messages.json]');
  process.exit(2);
}

const severities = ['error', 'warning', 'information', 'hint'];
const { document, diagnostics } = await fromFile(new Parser(), resolve(documentPath)).parse();
let failures = 0;
for (const d of diagnostics) {
  // Errors and warnings fail; information and hints (such as "a newer AsyncAPI version exists")
  // are printed only.
  if (d.severity <= 1) failures += 1;
  console.log(`${severities[d.severity]} ${d.code} at ${d.path.join('.') || '/'}: ${d.message}`);
}
if (!document) {
  console.error(`${documentPath}: not an AsyncAPI document (${failures} problems)`);
  process.exit(1);
}

const ajv = new Ajv({ strict: false, allErrors: true });
addFormats(ajv);
const schemas = new Map();
for (const message of document.allMessages()) {
  const name = message.name() || message.id();
  const payload = message.payload() ? ajv.compile(message.payload().json()) : null;
  const headers = message.headers() ? ajv.compile(message.headers().json()) : null;
  schemas.set(name, { payload, headers });
}

function check(what, name, headers, payload) {
  const schema = schemas.get(name);
  if (!schema) {
    console.log(`error ${what}: no message named ${name} in the document`);
    failures += 1;
    return;
  }
  for (const [part, validate, value] of [
    ['payload', schema.payload, payload],
    ['headers', schema.headers, headers],
  ]) {
    if (!validate || value === undefined) continue;
    if (!validate(value)) {
      failures += 1;
      for (const e of validate.errors) {
        console.log(`error ${what} ${part}${e.instancePath}: ${e.message} ${JSON.stringify(e.params)}`);
      }
    }
  }
}

let examples = 0;
for (const message of document.allMessages()) {
  const name = message.name() || message.id();
  for (const example of message.examples()) {
    examples += 1;
    check(`example ${example.name() || examples} of ${name}`, name, example.headers(), example.payload());
  }
}

let real = 0;
if (messagesPath) {
  for (const [index, m] of JSON.parse(readFileSync(messagesPath, 'utf8')).entries()) {
    real += 1;
    check(`message ${index} (${m.message})`, m.message, m.headers, m.payload);
  }
}

if (failures > 0) {
  console.error(`${documentPath}: ${failures} problem(s)`);
  process.exit(1);
}
console.log(
  `${documentPath}: valid AsyncAPI ${document.version()}; ${examples} example(s) and ${real} real message(s) match their schemas`,
);
