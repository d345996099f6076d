// Drives the system chromium (puppeteer-core, headless) through the web UI's
// flows against a running storage-proxy.  The page is served by this script
// from another loopback origin.  Usage: node run.js CONFIG.json
// CONFIG: {chromium, downloadDir, client, urls: {...}, steps: [...]}.
// Prints one line "RESULT <json>".
'use strict';
const http = require('http');
const fs = require('fs');
const puppeteer = require('puppeteer-core');

const cfg = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const tusJs = fs.readFileSync(require.resolve('tus-js-client/dist/tus.min.js'));
const html = '<!doctype html><meta charset="utf-8"><title>webui</title><script src="/tus.js"></script>';

async function main() {
  const server = http.createServer((req, res) => {
    if (req.url === '/tus.js') { res.writeHead(200, {'Content-Type': 'text/javascript'}); res.end(tusJs); return; }
    res.writeHead(200, {'Content-Type': 'text/html'}); res.end(html);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const origin = `http://127.0.0.1:${server.address().port}`;
  const browser = await puppeteer.launch({
    executablePath: cfg.chromium, headless: true,
    args: ['--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu'],
  });
  const result = {origin};
  try {
    const page = await browser.newPage();
    page.setDefaultTimeout(120000);
    await page.goto(origin + '/');
    const cdp = await page.createCDPSession();
    await cdp.send('Browser.setDownloadBehavior', {behavior: 'allow', downloadPath: cfg.downloadDir});
    Object.assign(result, await page.evaluate(inPage, cfg));
    if (cfg.steps.includes('anchor')) {
      // <a download> of the uploaded file: the browser saves it; the test checks its bytes.
      await page.evaluate((url) => {
        const a = document.createElement('a');
        a.href = url; a.download = 'big.bin'; document.body.appendChild(a); a.click();
      }, cfg.urls.bigDownload);
      const target = cfg.downloadDir + '/big.bin';
      const deadline = Date.now() + 60000;
      while (!fs.existsSync(target) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
      result.anchorSaved = fs.existsSync(target);
    }
  } finally {
    await browser.close();
    server.close();
  }
  console.log('RESULT ' + JSON.stringify(result));
}

// Runs in the page (the web UI's origin): every byte is checked here.
async function inPage(cfg) {
  const MiB = 1024 * 1024;
  const out = {};
  const hex = (buf) => [...new Uint8Array(buf)].map((b) => b.toString(16).padStart(2, '0')).join('');
  const sha = async (data) => hex(await crypto.subtle.digest('SHA-256', data));
  const b64 = (buf) => { let s = ''; const u = new Uint8Array(buf); for (let i = 0; i < u.length; i += 8192) s += String.fromCharCode(...u.subarray(i, i + 8192)); return btoa(s); };
  const random = (n) => { const u = new Uint8Array(n); for (let i = 0; i < n; i += 65536) crypto.getRandomValues(u.subarray(i, Math.min(n, i + 65536))); return u; };
  const equal = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);
  const chunkSize = (size) => size < 100 * MiB ? 15 * MiB : size < 1024 * MiB ? 50 * MiB : size < 5120 * MiB ? 100 * MiB : 200 * MiB;
  // The web UI's options (react/src/components/FileUploadManager.tsx).
  const options = (url, name, size) => ({
    endpoint: url, uploadUrl: url, chunkSize: chunkSize(size),
    retryDelays: [0, 3000, 5000, 10000, 20000], storeFingerprintForResuming: false,
    metadata: {filename: name, filetype: 'application/octet-stream'},
  });
  const upload = (url, name, data, extra = {}) => new Promise((resolve, reject) => {
    const blob = new Blob([data], {type: 'application/octet-stream'});
    const up = new tus.Upload(blob, Object.assign(options(url, name, data.length), {
      onError: reject, onSuccess: () => resolve(up),
    }, extra));
    up.start();
  });
  const fetchBytes = async (url, init) => { const r = await fetch(url, init); return [r, new Uint8Array(await r.arrayBuffer())]; };
  const u = cfg.urls;

  if (cfg.steps.includes('big')) {
    const data = random(cfg.bigSize);
    out.bigSha = await sha(data);
    const t0 = performance.now();
    await upload(u.bigUpload, 'big.bin', data);
    out.bigSeconds = (performance.now() - t0) / 1000;
    out.bigMBps = data.length / 1e6 / out.bigSeconds;
    if (cfg.steps.includes('upload-only')) return out;  // the benchmark
    const [r, back] = await fetchBytes(u.bigDownload);
    out.bigFetchStatus = r.status;
    out.bigFetchSha = await sha(back);
    if (cfg.steps.includes('range')) {
      const [r1, part] = await fetchBytes(u.bigDownload, {headers: {Range: 'bytes=1000-1999'}});
      out.range1 = {status: r1.status, contentRange: r1.headers.get('Content-Range'), equal: equal(part, data.subarray(1000, 2000))};
      const [r2, tail] = await fetchBytes(u.bigDownload, {headers: {Range: 'bytes=-100'}});
      out.rangeSuffix = {status: r2.status, contentRange: r2.headers.get('Content-Range'), equal: equal(tail, data.subarray(data.length - 100))};
    }
  }
  if (cfg.steps.includes('missing')) {
    try {
      const r = await fetch(u.missingDownload);
      out.missing = {status: r.status, body: await r.json()};
    } catch (e) { out.missing = {error: String(e)}; }
  }
  if (cfg.steps.includes('resume')) {
    const data = random(cfg.resumeSize);
    await new Promise((resolve, reject) => {
      let up;
      const blob = new Blob([data]);
      up = new tus.Upload(blob, Object.assign(options(u.resumeUpload, 'resume.bin', data.length), {
        onError: reject, onSuccess: () => reject(new Error('finished before the abort')),
        onProgress: (sent) => { if (sent >= 20 * MiB) { up.abort(false).then(resolve, reject); } },
      }));
      up.start();
    });
    const head = await fetch(u.resumeUpload, {method: 'HEAD', headers: {'Tus-Resumable': '1.0.0'}});
    out.resumedAt = Number(head.headers.get('Upload-Offset'));
    await upload(u.resumeUpload, 'resume.bin', data);
    const [r, back] = await fetchBytes(u.resumeDownload);
    out.resume = {status: r.status, equal: (await sha(back)) === (await sha(data))};
  }
  if (cfg.steps.includes('small')) {
    const one = random(1);
    await upload(u.oneUpload, 'one.bin', one);
    const [r1, b1] = await fetchBytes(u.oneDownload);
    out.one = {status: r1.status, equal: equal(b1, one), b64: b64(one)};
    await upload(u.emptyUpload, 'empty.bin', new Uint8Array(0));
    const [r0, b0] = await fetchBytes(u.emptyDownload);
    out.empty = {status: r0.status, length: b0.length};
  }
  if (cfg.steps.includes('zips')) {
    const [rz, zip] = await fetchBytes(u.dirZip);
    out.dirZip = {status: rz.status, disposition: rz.headers.get('Content-Disposition'), b64: b64(zip)};
    const [ra, arch] = await fetchBytes(u.archive);
    out.archive = {status: ra.status, disposition: ra.headers.get('Content-Disposition'), b64: b64(arch)};
  }
  return out;
}

main().catch((e) => { console.error('ERROR ' + (e && e.stack || e)); process.exit(1); });
