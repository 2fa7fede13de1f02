// Runs the station firmware under real MicroPython (WebAssembly) in Node.
// usage: node harness.mjs SPEC.json  — SPEC: {"files": {"name.py": "/path"}, "config": "...", "script": "..."}
// Everything the firmware prints goes to stdout; the script prints a line "RESULT {json}".
import { readFileSync } from "node:fs";
import { loadMicroPython } from "@micropython/micropython-webassembly-pyscript/micropython.mjs";

const spec = JSON.parse(readFileSync(process.argv[2], "utf8"));
const mp = await loadMicroPython({
  stdout: (line) => process.stdout.write(line + "\n"),
  stderr: (line) => process.stderr.write(line + "\n"),
});
for (const [name, path] of Object.entries(spec.files)) {
  mp.FS.writeFile("/" + name, readFileSync(path));
}
mp.FS.writeFile("/config.py", spec.config);
// jsgc.collect(): run JS's garbage collector (node --expose-gc), so that the proxies of awaited JS
// promises are finalized and release their MicroPython objects before the tests measure the heap
mp.registerJsModule("jsgc", { collect: () => { if (globalThis.gc) globalThis.gc(); } });
try {
  await mp.runPythonAsync(spec.script);
} catch (err) {
  process.stderr.write(String(err) + "\n");
  process.exit(1);
}
