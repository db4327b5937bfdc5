// Walks through the dashboard in Debian's Chromium with Playwright, as an operator would, and
// prints what it saw as one JSON object; tests/api/dashboard.rs starts the service, seeds it,
// runs this and checks the observations. Screenshots of every view go to <out-dir>.
//
//   node scripts/js/dashboard-walkthrough.mjs <plan.json>
//
// plan.json: {"base": "http://127.0.0.1:port", "outDir": "...", "chromium": "/usr/bin/chromium",
//   "admin": [user, password], "read": [user, password], "gateway": [user, password],
//   "funnelCount": "PROVIDE_ORDER:IN_PROGRESS", "unmatched": {"entityType": ..., "gatewayId": ...},
//   "liveKci": {...a KCI body posted while the overview is open...}}
//
// It fails (exit 1) only when the page does not get where it should within the timeouts; every
// judgement on what it saw is the Rust test's.
import { createRequire } from 'node:module';
import { readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';

const tools = process.env.KCI_TEST_JS_TOOLS || join(homedir(), '.cache/kci-receiver/js');
const { chromium } = createRequire(join(tools, 'package.json'))('playwright-core');

const plan = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const seen = {};
const shot = (page, name) => page.screenshot({ path: join(plan.outDir, `${name}.png`), fullPage: true });
// A list answers after its address changes: the region is busy while it shows "Loading…", and
// the region drawn before the change is still in the page for a moment. So mark the old region,
// navigate, and wait for a new region that holds its answer.
const nextList = async (page, navigate) => {
  await page.evaluate(() => document.querySelector('#list-result')?.setAttribute('data-stale', ''));
  await navigate();
  await page.waitForSelector('#list-result:not([aria-busy]):not([data-stale])');
};
const texts = (page, selector, attribute) =>
  page.$$eval(selector, (elements, attribute) =>
    elements.map((e) => [e.getAttribute(attribute), e.textContent.trim()]), attribute);

const browser = await chromium.launch({
  executablePath: plan.chromium,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const context = async ([username, password], viewport, colorScheme) =>
  browser.newContext({
    viewport, colorScheme,
    httpCredentials: { username, password, origin: plan.base, send: 'always' },
  });

try {
  // ---- Admin, desktop width ----------------------------------------------------------------
  const admin = await context(plan.admin, { width: 1280, height: 900 }, 'light');
  await admin.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: plan.base });
  const page = await admin.newPage();
  page.on('dialog', (dialog) => dialog.accept());
  const consoleErrors = [];
  page.on('console', (message) => { if (message.type() === 'error') consoleErrors.push(message.text()); });
  page.on('pageerror', (error) => consoleErrors.push(String(error)));

  await page.goto(`${plan.base}/dashboard`);
  await page.waitForSelector('[data-count]');
  seen.overview = {
    funnelCounts: Object.fromEntries(await texts(page, '[data-count]', 'data-count')),
    kcis: Object.fromEntries(await texts(page, '[data-kcis]', 'data-kcis')),
    attention: Object.fromEntries(await texts(page, '[data-attention]', 'data-attention')),
    charts: await page.$$eval('svg.chart', (charts) => charts.map((c) => c.getAttribute('aria-label'))),
    linksWithoutHref: await page.$$eval('a:not([href])', (links) => links.length),
    liveRegions: await page.$$eval('[aria-live]', (regions) => regions.map((r) => r.id)),
  };
  await shot(page, 'overview');

  // Keyboard: the first stops of Tab are the skip link and the navigation, each with a visible
  // focus ring.
  const focused = [];
  for (let i = 0; i < 4; i += 1) {
    await page.keyboard.press('Tab');
    focused.push(await page.evaluate(() => {
      const e = document.activeElement;
      return { tag: e.tagName, text: e.textContent.trim().slice(0, 40), outline: getComputedStyle(e).outlineStyle };
    }));
  }
  seen.keyboard = focused;

  // Live: a KCI arrives while the overview is open; the figures change without a reload.
  await page.evaluate(() => { window.__notReloaded = true; });
  const before = Number(seen.overview.kcis.INFORMATIONAL || 0);
  const [gatewayUser, gatewayPassword] = plan.gateway;
  const posted = await fetch(`${plan.base}/kcis`, {
    method: 'POST',
    headers: {
      'Content-Type': 'application/json', 'X-Request-ID': 'walkthrough-live', 'X-Conversation-ID': 'walkthrough-live',
      Authorization: `Basic ${Buffer.from(`${gatewayUser}:${gatewayPassword}`).toString('base64')}`,
    },
    body: JSON.stringify(plan.liveKci),
  });
  seen.livePostStatus = posted.status;
  await page.waitForFunction((before) =>
    Number(document.querySelector('[data-kcis="INFORMATIONAL"]')?.textContent) > before, before, { timeout: 30000 });
  seen.live = {
    informational: Number(await page.textContent('[data-kcis="INFORMATIONAL"]')),
    notReloaded: await page.evaluate(() => window.__notReloaded === true),
  };

  // ---- A filtered list, reached from a number of the overview --------------------------------
  await nextList(page, () => page.click(`[data-count="${plan.funnelCount}"]`));
  seen.list = {
    hash: await page.evaluate(() => location.hash),
    rows: await page.$$eval('#list-result tbody tr', (rows) => rows.map((r) => r.cells[0].textContent.trim())),
    statuses: await page.$$eval('#list-result tbody tr', (rows) => rows.map((r) => r.cells[1].textContent.trim())),
  };
  await shot(page, 'list');
  // The filter controls: unmatched only, applied through the form; the state is in the address.
  await nextList(page, () => page.goto(`${plan.base}/dashboard#/list/service-orders`));
  await page.selectOption('#filters select[name="correlation"]', 'unmatched');
  await nextList(page, () => page.click('#filters button[type="submit"]'));
  seen.filtered = {
    hash: await page.evaluate(() => location.hash),
    rows: await page.$$eval('#list-result tbody tr', (rows) => rows.map((r) => r.cells[0].textContent.trim())),
  };
  // A shared link opens the same view.
  const shared = await admin.newPage();
  await shared.goto(`${plan.base}/dashboard${seen.filtered.hash}`);
  await shared.waitForSelector('#list-result:not([aria-busy])');
  seen.filtered.sharedRows = await shared.$$eval('#list-result tbody tr', (rows) => rows.map((r) => r.cells[0].textContent.trim()));
  seen.filtered.sharedSelect = await shared.$eval('#filters select[name="correlation"]', (s) => s.value);
  await shared.close();

  // Cursor paging: two per page, next page, back to the first.
  const rowsOf = (p) => p.$$eval('#list-result tbody tr', (rows) => rows.map((r) => r.cells[0].textContent.trim()));
  await nextList(page, () => page.goto(`${plan.base}/dashboard#/list/entities?limit=2`));
  const firstPage = await rowsOf(page);
  await nextList(page, () => page.click('#list-result a[rel="next"]'));
  seen.paging = { firstPage, secondPage: await rowsOf(page), hash: await page.evaluate(() => location.hash) };
  await nextList(page, () => page.goto(`${plan.base}/dashboard${seen.filtered.hash}`));

  // ---- One entity: timeline, raw KCI, outbox event, deliveries, support text -----------------
  const { entityType, gatewayId } = plan.unmatched;
  await page.click(`#list-result a[href="#/entity/${entityType}/${gatewayId}"]`);
  await page.waitForSelector('#timeline');
  await page.click('#timeline details[data-kci] summary');
  await page.waitForSelector('#timeline details[data-kci] pre');
  await page.click('#timeline button[data-support]');
  await page.waitForSelector('.support-text');
  await page.click('.support .copy');
  await page.waitForTimeout(300);
  seen.entity = {
    title: (await page.textContent('#entity-title')).trim(),
    timeline: await page.$$eval('#timeline > li', (items) => items.map((i) => i.dataset.status)),
    kciDetail: (await page.textContent('#timeline details[data-kci] .kci-detail')).replace(/\s+/g, ' ').trim(),
    supportText: await page.textContent('.support-text'),
    clipboard: await page.evaluate(() => navigator.clipboard.readText()).catch((e) => `unreadable: ${e}`),
    actions: await page.$$eval('[data-action]', (buttons) => buttons.map((b) => b.dataset.action)),
    originalRequestBefore: (await page.textContent('#original-request')).trim(),
  };
  await shot(page, 'entity');

  // ---- Admin actions: register the original request, retry a dead event ----------------------
  await page.click('#register-form button[type="submit"]');
  await page.waitForFunction(() => !/Not registered/.test(document.querySelector('#original-request')?.textContent || 'Not registered'), null, { timeout: 15000 });
  seen.register = {
    originalRequest: (await page.textContent('#original-request')).trim(),
    title: (await page.textContent('#entity-title')).trim(),
    registerFormLeft: await page.$$eval('#register-form', (forms) => forms.length),
    toasts: await page.$$eval('#toast p', (ps) => ps.map((p) => p.textContent)),
  };
  await page.goto(`${plan.base}/dashboard#/dead`);
  await page.waitForSelector('#dead-events, #no-dead');
  seen.dead = { before: await page.$$eval('button[data-retry]', (b) => b.length) };
  await shot(page, 'dead-events');
  if (seen.dead.before > 0) {
    await page.click('button[data-retry]');
    await page.waitForSelector('#no-dead', { timeout: 15000 });
  }
  seen.dead.after = await page.$$eval('button[data-retry]', (b) => b.length);
  seen.consoleErrors = consoleErrors;
  await admin.close();

  // ---- Read-only: the same views without actions ---------------------------------------------
  const read = await context(plan.read, { width: 1280, height: 900 }, 'light');
  const readPage = await read.newPage();
  await readPage.goto(`${plan.base}/dashboard#/entity/${entityType}/${gatewayId}`);
  await readPage.waitForSelector('#timeline');
  const readActions = await readPage.$$eval('[data-action], #register-form', (e) => e.length);
  await readPage.goto(`${plan.base}/dashboard#/dead`);
  await readPage.waitForSelector('#dead-events, #no-dead');
  seen.readOnly = {
    entityActions: readActions,
    deadButtons: await readPage.$$eval('button[data-retry], button[data-skip], #retry-all', (e) => e.length),
    role: await readPage.evaluate(() => document.body.dataset.role),
  };
  await read.close();

  // ---- A phone's width, and dark mode --------------------------------------------------------
  const phone = await context(plan.read, { width: 390, height: 844 }, 'dark');
  const phonePage = await phone.newPage();
  await phonePage.goto(`${plan.base}/dashboard`);
  await phonePage.waitForSelector('[data-count]');
  seen.phone = {
    scrollWidth: await phonePage.evaluate(() => document.documentElement.scrollWidth),
    background: await phonePage.evaluate(() => getComputedStyle(document.body).backgroundColor),
  };
  await shot(phonePage, 'overview-phone-dark');
  await phone.close();
} finally {
  await browser.close();
}
console.log(JSON.stringify(seen));
