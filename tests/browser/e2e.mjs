// The dashboard as a person uses it, in headless Chromium. Run by tests/it/browser.rs,
// which starts skald with one completed and one parked (failed) saga and fixes the
// failed one's cause first. BASE_URL: the dashboard; SCREENSHOT: where to save it.
import { launch, openPage } from "./launch.mjs";

const screenshot = process.env.SCREENSHOT;
const failedId = process.env.FAILED_ID;
const browser = await launch();
try {
  const page = await openPage(browser);

  // Both instances are listed, with their states.
  const rows = page.locator("#instances tbody tr");
  await rows.filter({ hasText: "completed" }).first().waitFor({ timeout: 15000 });
  const failedRow = page.locator(`#instances tbody tr[data-id="${failedId}"]`);
  await failedRow.waitFor({ timeout: 15000 });
  if (!(await failedRow.textContent()).includes("failed")) throw new Error("the parked saga is not shown as failed");
  await page.locator("#health.ok").waitFor({ timeout: 15000 });
  // Live instances per saga version (nothing live once every saga ended or parked).
  const live = await page.locator("#sagas tbody td.live-versions").first().textContent();
  if (!/^(none|v\d+: \d+( · v\d+: \d+)*)$/.test(live)) throw new Error(`live per version shows ${live}`);

  // Its timeline shows the failed attempt as a picture, with the error.
  await failedRow.click();
  await page.locator("#detail .bar.failed").first().waitFor({ timeout: 10000 });
  await page.locator("#detail .err").first().waitFor({ timeout: 10000 });
  await page.locator("#graph rect").first().waitFor({ timeout: 10000 });
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });

  // Replay its dead letter with the button, and see the saga complete.
  await page.locator("#dead tbody tr", { hasText: "exhausted" }).locator("button[data-act=replay]").click();
  await page.locator(`#instances tbody tr[data-id="${failedId}"]`, { hasText: "completed" }).waitFor({ timeout: 20000 });
  await page.locator("#dead tbody tr", { hasText: "replayed" }).first().waitFor({ timeout: 10000 });
  console.log("dashboard e2e: ok");
} finally {
  await browser.close();
}
