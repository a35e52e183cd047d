// Drives kontext's status page in headless Chromium (Debian's), through
// playwright-core: lists services and partitions, pauses a type and sees
// its handled counter stop, resumes it, replays a dead letter, and saves a
// screenshot, shows a topic's recent messages with a sensitive field
// redacted. Usage:
// node status_page.mjs <page url> <token> <screenshot> <a sensitive value> [type]
import { chromium } from 'playwright-core';

const [url, token, screenshot, sensitive, type = 'Parcel'] = process.argv.slice(2);
const rowOf = '#types tr[data-type="' + type + '"]';
const executablePath = process.env.KONTEXT_CHROMIUM || '/usr/bin/chromium';
const browser = await chromium.launch({ executablePath, args: ['--no-sandbox'] });
const fail = async (why) => {
  console.error('browser test: ' + why);
  await browser.close();
  process.exit(1);
};
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  await page.goto(url);
  const row = page.locator(rowOf);
  await row.waitFor({ timeout: 30000 });
  // The running service and its partitions.
  await page.waitForFunction(() => {
    const cells = [...document.querySelectorAll('#services td.assigned')];
    return cells.some((c) => c.textContent.includes('/'));
  }, null, { timeout: 30000 });
  // Their positions (committed, end, lag), from the consumer's statistics.
  await page.waitForFunction(() => document.querySelectorAll('#partitions tbody tr').length >= 2, null, { timeout: 30000 });
  await page.fill('#token', token);
  await page.dispatchEvent('#token', 'change');
  const handled = async () => Number(await row.locator('td.handled').textContent());
  const refreshes = () => page.evaluate(() => window.kontextRefreshes);
  await page.waitForFunction((r) => Number(document.querySelector(r + ' td.handled').textContent) > 0, rowOf, { timeout: 30000 });

  // Pause: shown paused, and the counter stops over several refreshes.
  await row.locator('button.pause').click();
  await page.waitForFunction((r) => document.querySelector(r + ' td.state').textContent === 'paused', rowOf, { timeout: 30000 });
  // Records already in the lane finish first: wait for its buffer to drain.
  await page.waitForFunction((r) => document.querySelector(r + ' td.buffer').textContent.startsWith('0/'), rowOf, { timeout: 30000 });
  const paused = await handled();
  const seen = await refreshes();
  // Records keep arriving meanwhile: the partitions' ends (librdkafka's
  // statistics, every 5 s) move past where they were.
  const ends = () => page.evaluate(() => [...document.querySelectorAll('#partitions tbody tr td:nth-child(5)')]
    .reduce((sum, td) => sum + (Number(td.textContent) || 0), 0));
  const endsAtPause = await ends();
  await page.waitForFunction((n) => window.kontextRefreshes >= n + 3, seen, { timeout: 30000 });
  await page.waitForFunction((before) => [...document.querySelectorAll('#partitions tbody tr td:nth-child(5)')]
    .reduce((sum, td) => sum + (Number(td.textContent) || 0), 0) > before, endsAtPause, { timeout: 30000 });
  if ((await handled()) !== paused) await fail(`handled moved while paused: ${paused} -> ${await handled()} (ends ${endsAtPause} -> ${await ends()})`);
  await page.screenshot({ path: screenshot, fullPage: true });

  // Resume: the counter moves again.
  await row.locator('button.resume').click();
  await page.waitForFunction(([r, n]) => Number(document.querySelector(r + ' td.handled').textContent) > n, [rowOf, paused], { timeout: 30000 });
  await page.waitForFunction((r) => document.querySelector(r + ' td.state').textContent === 'flowing', rowOf, { timeout: 30000 });

  // Replay: the dead letter goes back and is handled.
  const dead = Number(await row.locator('td.dead').textContent());
  if (dead < 1) await fail('no dead letter to replay');
  await row.locator('button.replay').click();
  await page.waitForFunction(() => /replay: 200 .*"replayed":1/.test(document.querySelector('#msg').textContent), null, { timeout: 60000 });

  // Recent messages of the topic: decoded, newest first, the sensitive
  // field redacted.
  await page.locator('#topics tr[data-topic] button.recent').first().click();
  await page.waitForFunction(() => document.querySelectorAll('#messages tbody tr').length >= 5, null, { timeout: 30000 });
  const payloads = await page.locator('#messages td.payload').allTextContents();
  // Decoded payloads show the sensitive field redacted; one the codec
  // refuses (a poison record) shows why, never its bytes.
  const decoded = payloads.filter((p) => p.startsWith('{'));
  if (decoded.length === 0 || !decoded.every((p) => p.includes('":"<redacted>"'))) await fail('payloads not decoded and redacted: ' + payloads.join(' | '));
  if ((await page.content()).includes(sensitive)) await fail('the sensitive value is on the page');
  // Every topic's, dead letters included: the sensitive value nowhere.
  const names = await page.locator('#topics tr[data-topic]').evaluateAll((rows) => rows.map((r) => r.dataset.topic));
  for (const name of names) {
    await page.evaluate(() => { document.querySelector('#recent-topic').textContent = ''; });
    await page.locator(`#topics tr[data-topic="${name}"] button.recent`).click();
    await page.waitForFunction((n) => document.querySelector('#recent-topic').textContent === 'of ' + n, name, { timeout: 30000 });
    if ((await page.content()).includes(sensitive)) await fail(`the sensitive value is on the page, with ${name}'s messages`);
  }
  await page.evaluate(() => { document.querySelector('#recent-topic').textContent = ''; });
  await page.locator('#topics tr[data-topic] button.recent').first().click();
  await page.waitForFunction((n) => document.querySelector('#recent-topic').textContent === 'of ' + n, names[0], { timeout: 30000 });
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(`browser test: ok (handled ${paused} while paused, replayed 1, ${payloads.length} recent messages)`);
  await browser.close();
} catch (e) {
  await fail(String(e && e.stack || e));
}
