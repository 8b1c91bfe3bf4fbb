// Drives Debian's chromium through the coordinator's dashboard for tests/tests/dashboard.rs.
// Usage: node dashboard.mjs URL SCREENSHOT_DIR USER_DATA_DIR RELEASE_1 RELEASE_2
// The job under test prints "tick one", waits for RELEASE_1, prints "tick two", waits for
// RELEASE_2 and ends; this script writes those files once the page has shown each line.
// Prints one line per check passed; exits non-zero with the reason on the first failure.
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [url, screenshots, userDataDir, release1, release2] = process.argv.slice(2);
const WAIT = { timeout: 240_000 };

const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
  viewport: { width: 1366, height: 900 },
});
try {
  const page = context.pages()[0] || (await context.newPage());
  page.on("pageerror", (error) => console.log(`page error: ${error}`));
  await page.goto(url);

  await page.locator('#connection[data-connection="live"]').waitFor(WAIT);
  console.log("ok: the page is live");
  await page.locator('#agents tr[data-agent-id="worker-1"]').waitFor(WAIT);
  console.log("ok: agent worker-1 is shown connected");

  const running = page.locator('#running [data-job-state="running"]').first();
  await running.waitFor(WAIT);
  const jobId = await running.getAttribute("data-job-id");
  console.log(`ok: job ${jobId} is shown running`);

  const tail = page.locator(`pre[data-job-tail="${jobId}"]`);
  await tail.filter({ hasText: "tick one" }).waitFor(WAIT);
  console.log("ok: the live tail shows the first line");
  writeFileSync(release1, "go\n");
  await tail.filter({ hasText: "tick two" }).waitFor(WAIT);
  console.log("ok: the live tail updated with the second line");
  await page.screenshot({ path: join(screenshots, "dashboard-running.png"), fullPage: true });

  writeFileSync(release2, "go\n");
  const finished = page.locator(`#finished tr[data-job-id="${jobId}"][data-job-state="finished"]`);
  await finished.waitFor(WAIT);
  const outcome = await finished.getAttribute("data-outcome");
  console.log(`ok: job ${jobId} is shown finished with outcome ${outcome}`);
  await page.locator(`#running [data-job-id="${jobId}"]`).waitFor({ state: "detached", ...WAIT });
  console.log("ok: the job left the running list");
  await page.screenshot({ path: join(screenshots, "dashboard-finished.png"), fullPage: true });
} catch (error) {
  console.log(`FAILED: ${error.message}`);
  process.exitCode = 1;
} finally {
  await context.close();
}
