// What the end-to-end tests share: the fieldsync binary run as CLI commands and as
// daemons (their JSON Lines events awaited), polling until something holds, and named
// steps counted as passed or failed. No npm dependencies.
import { spawn, execFileSync } from "node:child_process";
import { createWriteStream, readFileSync } from "node:fs";
import { createServer } from "node:net";
import { join } from "node:path";

/** A free TCP port on 127.0.0.1 (so a restarted daemon can keep its addresses). */
export async function freePort() {
  const s = createServer();
  await new Promise((r) => s.listen(0, "127.0.0.1", r));
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}

/** Chromium's headless flags for these machines. */
export const CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"];

/**
 * `bin`: the fieldsync binary; `work`: a scratch directory (daemon stderr goes there);
 * `wait`: how long a wait may take (ms).
 */
export function harness({ bin, work, wait = 30000 }) {
  // The children's environment: quiet logs, and no FIELDSYNC_DATA (each gets --data).
  const env = Object.fromEntries(Object.entries({ ...process.env, RUST_LOG: "warn" }).filter(([k]) => k !== "FIELDSYNC_DATA"));
  const procs = [];
  let passed = 0;
  let failed = 0;

  /** Runs a CLI command; its JSON (one value, or an array of the lines), or the raw text of `invite`. */
  function cli(dir, args, { allowFail = false } = {}) {
    try {
      const out = execFileSync(bin, ["--data", dir, ...args], { encoding: "utf8", env, stdio: ["ignore", "pipe", "pipe"], timeout: wait });
      if (args[0] === "invite") return out;
      const lines = out.split("\n").filter((l) => l.trim().startsWith("{") || l.trim().startsWith("["));
      const values = lines.map((l) => JSON.parse(l));
      return values.length === 1 ? values[0] : values;
    } catch (e) {
      if (allowFail) return null;
      throw new Error(`fieldsync ${args.join(" ")}: ${e.stderr || e.message}`);
    }
  }

  class Daemon {
    constructor(name, dir, args) {
      this.name = name;
      this.events = [];
      this.waiters = [];
      const err = createWriteStream(join(work, `${name}.err`), { flags: "a" });
      this.child = spawn(bin, ["--data", dir, ...args], { env, stdio: ["ignore", "pipe", "pipe"] });
      this.child.stderr.pipe(err);
      this.exited = new Promise((r) => this.child.on("exit", r));
      let buf = "";
      this.child.stdout.on("data", (chunk) => {
        buf += chunk;
        let i;
        while ((i = buf.indexOf("\n")) >= 0) {
          const line = buf.slice(0, i);
          buf = buf.slice(i + 1);
          try {
            const ev = JSON.parse(line);
            this.events.push(ev);
            this.waiters = this.waiters.filter((w) => !(w.check(ev) && (w.resolve(ev), true)));
          } catch {
            /* not JSON */
          }
        }
      });
      procs.push(this);
    }
    /** Waits for an event `check` accepts (one seen before counts unless `fresh`). */
    waitFor(what, check, { fresh = false, ms = wait } = {}) {
      const seen = !fresh && this.events.find(check);
      if (seen) return Promise.resolve(seen);
      return new Promise((resolve, reject) => {
        const t = setTimeout(() => reject(new Error(`${this.name}: no ${what} within ${ms} ms; saw ${JSON.stringify(this.events.slice(-8))}`)), ms);
        this.waiters.push({ check, resolve: (v) => (clearTimeout(t), resolve(v)) });
      });
    }
    event(name, opts) {
      return this.waitFor(`${name} event`, (e) => e.event === name, opts);
    }
    async stop() {
      if (this.child.exitCode !== null || this.child.signalCode) return;
      this.child.kill("SIGTERM");
      const t = setTimeout(() => this.child.kill("SIGKILL"), 10000);
      await this.exited;
      clearTimeout(t);
    }
  }

  /** Polls `check` every 200 ms until it returns something truthy; that value. */
  async function until(what, check, ms = wait) {
    const deadline = Date.now() + ms;
    let last;
    while (Date.now() < deadline) {
      try {
        last = await check();
        if (last) return last;
      } catch (e) {
        last = e;
      }
      await new Promise((r) => setTimeout(r, 200));
    }
    throw new Error(`timed out waiting for ${what} (last: ${last instanceof Error ? last.message : JSON.stringify(last)})`);
  }

  /** Runs one named step, printing ok/FAIL with its time; a failure ends the run. */
  async function step(name, fn) {
    const started = Date.now();
    try {
      await fn();
      passed++;
      console.log(`ok   ${name} (${Date.now() - started} ms)`);
    } catch (e) {
      failed++;
      console.log(`FAIL ${name}: ${e.stack || e}`);
      throw e;
    }
  }

  function assert(cond, message) {
    if (!cond) throw new Error(message);
  }

  /**
   * Runs `main` within `timeoutS` seconds, then stops every daemon and runs `cleanup`, also on
   * failure, timeout or a signal; on failure prints the last stderr lines of the daemons
   * named in `logs`. Prints "N passed, N failed" and exits non-zero on any failure.
   */
  async function run(main, { timeoutS, cleanup = async () => {}, logs = [] }) {
    const finish = async () => {
      await Promise.all(procs.map((p) => p.stop().catch(() => {})));
      await cleanup().catch(() => {});
    };
    const timer = setTimeout(async () => {
      console.log(`FAIL the end-to-end test did not finish within ${timeoutS} s`);
      failed++;
      await finish();
      console.log(`${passed} passed, ${failed} failed`);
      process.exit(1);
    }, timeoutS * 1000);
    for (const signal of ["SIGINT", "SIGTERM"]) {
      process.on(signal, async () => {
        await finish();
        process.exit(130);
      });
    }
    let code = 0;
    try {
      await main();
    } catch (e) {
      if (failed === 0) {
        failed++;
        console.log(`FAIL setup: ${e.stack || e}`);
      }
      code = 1;
      for (const name of logs) {
        try {
          const text = readFileSync(join(work, `${name}.err`), "utf8").trim();
          if (text) console.log(`--- ${name} stderr (last lines)\n${text.split("\n").slice(-15).join("\n")}`);
        } catch {
          /* none */
        }
      }
    } finally {
      clearTimeout(timer);
      await finish();
    }
    console.log(`${passed} passed, ${failed} failed`);
    process.exit(code);
  }

  return {
    run,
    cli,
    Daemon,
    until,
    step,
    assert,
    stopAll: () => Promise.all(procs.map((p) => p.stop().catch(() => {}))),
    passed: () => passed,
    failed: () => failed,
  };
}
