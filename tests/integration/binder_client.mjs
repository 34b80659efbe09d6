// Drive one /build launch with BinderHub's own, unmodified JavaScript client
// (@jupyterhub/binderhub-client), the way a Binder web page does.
//
//   node binder_client.mjs <build endpoint URL> <provider spec> [--build-only] [--build-token T]
//
// Prints every event the client yields as one JSON line on stdout (and nothing else there: the
// client's own console.log diagnostics go to stderr). On the first event whose phase is "ready"
// or "failed" it closes the client and exits 0 once Node has nothing left to do, so an error the
// client throws while closing still fails the run. Exit codes: 0 as said; 1 an uncaught error, or
// the stream ended without either phase; 2 no such event within 60 s (what was seen goes to
// stderr); 3 the client still held the process 5 s after close(); 64 bad arguments.
// Used by tests/integration/test_binder_client.py.

import { BinderRepository } from "@jupyterhub/binderhub-client/client.js";

const TIMEOUT_MS = 60_000;

// The browser globals the client's dependency uses unconditionally. fetch-event-source calls
// `window.fetch` (the client passes no `fetch` of its own), `window.setTimeout` and
// `window.clearTimeout` for reconnects, and `document.removeEventListener("visibilitychange")`
// whenever a stream ends or is aborted, even with `openWhenHidden: true` (it adds no listener
// then). Without `window` no request is made; without `document` close() throws
// "ReferenceError: document is not defined". In a browser `window` is the global object, so it is
// here too; `document` is a page that is never hidden and has no cookies (no `_xsrf` cookie: the
// client sends no XSRF header, as on a Binder page served from another site).
globalThis.window = globalThis;
globalThis.document = {
  hidden: false,
  cookie: "",
  addEventListener() {},
  removeEventListener() {},
};
// The client never awaits the promise fetch-event-source returns, and that promise rejects
// whenever the client closes the stream itself (its EventStreamClose after a "failed" event).
// A browser reports such a rejection in the console and carries on; Node would end the process
// with exit code 1 instead ("EventStreamClose" after every failed launch). Report it on stderr,
// as a browser console would.
process.on("unhandledRejection", (reason) => {
  const what = reason instanceof Error ? `${reason.name}: ${reason.message}` : String(reason);
  console.error(`unhandled rejection (a browser logs this and carries on): ${what}`);
});
// The client logs stream errors with console.log; keep stdout for the events alone.
console.log = console.error;

function parseArgs(argv) {
  const positional = [];
  const options = { buildOnly: false, buildToken: undefined };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--build-only") {
      options.buildOnly = true;
    } else if (argv[i] === "--build-token" && i + 1 < argv.length) {
      options.buildToken = argv[++i];
    } else if (argv[i].startsWith("--")) {
      usage(`unknown option ${argv[i]}`);
    } else {
      positional.push(argv[i]);
    }
  }
  if (positional.length !== 2) {
    usage("expected a build endpoint URL and a provider spec");
  }
  return { endpoint: positional[0], providerSpec: positional[1], options };
}

function usage(problem) {
  console.error(`${problem}
usage: node binder_client.mjs <build endpoint URL> <provider spec> [--build-only] [--build-token T]`);
  process.exit(64);
}

const { endpoint, providerSpec, options } = parseArgs(process.argv.slice(2));
const repo = new BinderRepository(providerSpec, new URL(endpoint), options);
const seen = [];

const timer = setTimeout(() => {
  console.error(
    JSON.stringify({
      error: `no ready or failed event within ${TIMEOUT_MS / 1000} s`,
      buildUrl: repo.buildUrl.toString(),
      phases: seen.map((event) => event.phase),
    }),
  );
  repo.close();
  process.exit(2);
}, TIMEOUT_MS);

for await (const event of repo.fetch()) {
  seen.push(event);
  process.stdout.write(`${JSON.stringify(event)}\n`);
  if (event.phase === "ready" || event.phase === "failed") {
    repo.close();
    clearTimeout(timer);
    // Fires only if close() left something (a connection, a reconnect timer) holding Node open.
    setTimeout(() => {
      console.error("the client still held the process 5 s after close()");
      process.exit(3);
    }, 5_000).unref();
    process.exitCode = 0;
    break;
  }
}
if (process.exitCode !== 0) {
  // Not reached while the client pushes "failed" before it stops its iterator.
  clearTimeout(timer);
  console.error(JSON.stringify({ error: "the event stream ended without ready or failed" }));
  process.exitCode = 1;
}
