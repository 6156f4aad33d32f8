// Validates AsyncAPI documents with the official parser (@asyncapi/parser).
// Usage: node scripts/asyncapi-validate.mjs FILE...  (exit 1 on any error)
// `make test-tools` installs the parser into target/asyncapi.
import { createRequire } from 'node:module';
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';

const require = createRequire(resolve('target/asyncapi/package.json'));
const { Parser } = require('@asyncapi/parser');

const parser = new Parser();
let failed = false;
for (const file of process.argv.slice(2)) {
  const { document, diagnostics } = await parser.parse(readFileSync(file, 'utf8'));
  const errors = diagnostics.filter((d) => d.severity === 0);
  for (const d of errors) {
    console.error(`${file}: ${d.message} at ${JSON.stringify(d.path)}`);
  }
  if (!document || errors.length > 0) {
    failed = true;
  } else {
    console.log(`${file}: valid AsyncAPI ${document.version()} with ${document.channels().length} channels`);
  }
}
process.exit(failed ? 1 : 0);
