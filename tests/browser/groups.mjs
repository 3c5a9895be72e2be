// Failure groups on the dashboard, in headless Chromium. Run by tests/it/browser.rs,
// which starts skald with instances failing in two groups and fixes the cause first.
// BASE_URL: the dashboard; CODE: the code of the group to retry; RETRIED: how many
// instances that group's retry must complete.
import { launch, openPage } from "./launch.mjs";

const browser = await launch();
try {
  const page = await openPage(browser);
  const group = page.locator("#groups tbody tr", { hasText: process.env.CODE });
  await group.waitFor({ timeout: 15000 });
  await group.locator("button[data-act=retry]").click();
  await page.locator("#group-result", { hasText: "retry: 3 done, 0 skipped" }).waitFor({ timeout: 15000 });
  const want = Number(process.env.RETRIED);
  await page.waitForFunction(
    (n) => [...document.querySelectorAll("#instances tbody tr")].filter((tr) => tr.textContent.includes("completed")).length === n,
    want, { timeout: 20000 });
  console.log("failure groups e2e: ok");
} finally {
  await browser.close();
}
