// Drives the real client in Debian's headless Chromium (never a downloaded
// browser) against a real relay started by run.sh (RELAY_URL).
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { chromium } from 'playwright-core';

const URL = process.env.RELAY_URL || 'http://127.0.0.1:8080';
const ARTIFACTS = process.env.ARTIFACTS || 'artifacts';
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--headless', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
after(() => browser.close());

const problems = [];
async function player(name, room) {
  const ctx = await browser.newContext({ viewport: { width: 1000, height: 640 } });
  const page = await ctx.newPage();
  page.on('pageerror', (e) => problems.push(`${name}: ${e}`));
  page.on('dialog', (d) => { problems.push(`${name}: dialog ${d.message()}`); d.dismiss(); });
  await page.goto(URL);
  await page.fill('[data-testid=name]', name);
  await page.click('[data-testid=connect]');
  await page.fill('[data-testid=room]', room);
  await page.click('[data-testid=join]');
  await page.waitForSelector(`[data-testid="tab-${room}"]`);
  return page;
}
const texts = (page) => page.$$eval('#messages li:not(.presence)', (ls) => ls.map((l) => l.textContent));
async function say(page, text) {
  await page.fill('[data-testid=text]', text);
  await page.press('[data-testid=text]', 'Enter');
}

test('two players chat, history survives a reload, text stays text', async () => {
  const room = `chat.e2e${Date.now()}`;
  const a = await player('alice', room);
  const b = await player('bob', room);
  await a.waitForFunction(() => document.querySelector('#members')?.textContent.includes('bob'));
  await say(a, 'hello from alice');
  await say(b, '<img src=x onerror=alert(1)>');
  const want = ['alicehello from alice', 'bob<img src=x onerror=alert(1)>'];
  for (const p of [a, b]) {
    await p.waitForFunction((n) => document.querySelectorAll('#messages li:not(.presence):not(.pending)').length >= n, 2);
    await p.waitForTimeout(300);
    assert.deepEqual(await texts(p), want, 'each message once, in order, acked');
    assert.equal(await p.$$eval('#messages img', (x) => x.length), 0, 'no <img> element was created');
  }
  // Own-message latency is measured.
  await a.waitForFunction(() => /ms/.test(document.querySelector('[data-testid=latency]').textContent));
  // Reload: name and room come back, with the history and no duplicates.
  await b.reload();
  await b.waitForFunction((n) => document.querySelectorAll('#messages li:not(.presence)').length >= n, 2);
  await b.waitForTimeout(500);
  assert.deepEqual(await texts(b), want, 'history after reload, no duplicates');
  assert.equal(await b.textContent('[data-testid=backend]'), 'memory');
  mkdirSync(ARTIFACTS, { recursive: true });
  await a.screenshot({ path: `${ARTIFACTS}/chat.png` });
  assert.deepEqual(problems, [], 'no page errors, no dialogs');
});
