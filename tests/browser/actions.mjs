// The instance buttons and the search box, in headless Chromium. Run by
// tests/it/browser.rs, which starts skald with one instance parked (failed) and its
// cause fixed. BASE_URL: the dashboard; FAILED_ID: the parked instance; AGGREGATE: its
// aggregate id; MESSAGE_ID: its start message's id.
import { launch, openPage } from "./launch.mjs";

const failedId = process.env.FAILED_ID;
const browser = await launch();
try {
  const page = await openPage(browser);
  const row = () => page.locator(`#instances tbody tr[data-id="${failedId}"]`);

  // A search by message id finds the instance, saying how it matched.
  await page.locator("#q").fill(process.env.MESSAGE_ID);
  await page.locator("#search button[type=submit]").click();
  await page.locator("#search-result", { hasText: "1 found" }).waitFor({ timeout: 10000 });
  await row().filter({ hasText: "message id" }).waitFor({ timeout: 10000 });

  // A search for nothing known finds nothing.
  await page.locator("#q").fill("no-such-aggregate");
  await page.locator("#search button[type=submit]").click();
  await page.locator("#search-result", { hasText: "0 found" }).waitFor({ timeout: 10000 });
  if (await page.locator("#instances tbody tr").count() !== 0) throw new Error("a search for nothing lists instances");

  // A search by aggregate id finds it; the person opens it.
  await page.locator("#q").fill(process.env.AGGREGATE);
  await page.locator("#search button[type=submit]").click();
  await row().filter({ hasText: "aggregate id" }).waitFor({ timeout: 10000 });
  await row().click();
  await page.locator("#detail .bar.failed").first().waitFor({ timeout: 10000 });

  // "retry now" on a parked instance: the API refuses, and the page says why.
  await page.locator("#instance-actions button[data-act=retry]").click();
  await page.locator("#action-result.err", { hasText: "retry refused: " }).waitFor({ timeout: 10000 });
  const refusal = await page.locator("#action-result").textContent();
  if (!refusal.includes("has no retry pending")) throw new Error(`the refusal shows ${refusal}`);

  // "resume" replays its dead letter: done, and the instance completes.
  await page.locator("#instance-actions button[data-act=resume]").click();
  await page.locator("#action-result.ok-text", { hasText: "resume: done" }).waitFor({ timeout: 10000 });
  await row().filter({ hasText: "completed" }).waitFor({ timeout: 20000 });

  // Clearing the search lists the instances again.
  await page.locator("#search-clear").click();
  await page.waitForFunction(() => document.querySelectorAll("#instances tbody tr").length === 2, null, { timeout: 10000 });
  console.log("instance actions and search e2e: ok");
} finally {
  await browser.close();
}
