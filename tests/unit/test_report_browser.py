#!/usr/bin/python3
"""test_report_browser.py - open a kvtrace report in headless Chromium and check it from the
inside, over the DevTools protocol (--remote-debugging-pipe; Python stdlib only).

usage: test_report_browser.py CHROMIUM INDEX_HTML [--no-chartjs] [--hostile TEXT]
       [--screenshot OUT.png]

Fails (exit 1, one line per problem) on: an uncaught exception or console error, a JavaScript
dialog (alert/confirm/prompt), any request that is not file: or data:, a page script error
recorded by the page (#js-errors), fewer figures than the page announces (every canvas drawn
and not blank, every per-head heatmap filled (recall and error, and the kept entries of each
policy that allocates), every PNG decoded), a hostile TEXT that is not
shown verbatim as text (title, h1, heatmap caption of the policy labelled TEXT + "snapkv") or
that created elements, and a blank screenshot.
"""
import base64
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib


class Browser:
    """Chromium with the DevTools protocol on fds 3 (commands in) and 4 (replies out)."""

    def __init__(self, chromium, profile):
        cmd_r, self.cmd_w = os.pipe()
        self.out_r, out_w = os.pipe()

        def child_fds():  # via fds >= 10, so neither dup2 can clobber the other pipe
            a = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(out_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        args = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-extensions",
                "--disable-default-apps", "--no-first-run", "--no-default-browser-check",
                "--metrics-recording-only", "--mute-audio", "--hide-scrollbars",
                # anything that still tries the network fails, and shows up as a request
                '--host-resolver-rules=MAP * ~NOTFOUND', "--proxy-server=127.0.0.1:9",
                "--user-data-dir=" + profile, "--window-size=1280,900",
                "--remote-debugging-pipe", "about:blank"]
        self.proc = subprocess.Popen(args, pass_fds=(3, 4), preexec_fn=child_fds,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(out_w)
        self.buf = b""
        self.next_id = 0
        self.events = []
        self.session = None

    def _read_msg(self, deadline):
        while b"\0" not in self.buf:
            if time.time() > deadline:
                raise TimeoutError("no reply from chromium")
            chunk = os.read(self.out_r, 1 << 20)
            if not chunk:
                raise EOFError("chromium closed the pipe")
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method, params=None, session=True, timeout=30):
        self.next_id += 1
        my_id = self.next_id  # on_event may send (and number) a command meanwhile
        msg = {"id": my_id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self.cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            m = self._read_msg(deadline)
            if m.get("id") == my_id:
                if "error" in m:
                    raise RuntimeError("%s: %s" % (method, m["error"]))
                return m.get("result", {})
            self.on_event(m)

    def on_event(self, m):
        if "method" not in m:
            return
        self.events.append(m)
        if m["method"] == "Page.javascriptDialogOpening":  # never leave a dialog blocking
            self.send_nowait("Page.handleJavaScriptDialog", {"accept": False})

    def send_nowait(self, method, params):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params,
               "sessionId": self.session}
        os.write(self.cmd_w, json.dumps(msg).encode() + b"\0")

    def pump(self, seconds):
        """Collect events for a while (the pipe is read with a deadline per message)."""
        end = time.time() + seconds
        while time.time() < end:
            try:
                self.send("Runtime.evaluate", {"expression": "1"}, timeout=end - time.time() + 5)
            except TimeoutError:
                break
            time.sleep(0.05)

    def wait_for(self, expression, timeout):
        end = time.time() + timeout
        while time.time() < end:
            v = self.eval(expression)
            if v:
                return v
            time.sleep(0.1)
        return None

    def eval(self, expression):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in r:
            raise RuntimeError("evaluate %s: %s" % (expression, r["exceptionDetails"]))
        return r["result"].get("value")

    def close(self):
        try:
            self.send("Browser.close", session=False, timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def png_pixels(data):
    """Decode an 8-bit RGB/RGBA PNG (what Chromium writes) into (w, h, rows of bytes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, w = 8, b"", 0
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h = int.from_bytes(body[0:4], "big"), int.from_bytes(body[4:8], "big")
            depth, ctype, interlace = body[8], body[9], body[12]
            assert depth == 8 and ctype in (2, 6) and interlace == 0, "unsupported PNG"
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    stride = w * bpp
    rows, prev = [], bytearray(stride)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if f == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif f == 2:
            for i in range(stride):
                line[i] = (line[i] + prev[i]) & 255
        elif f == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 255
        elif f == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b, c = prev[i], prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 255
        rows.append(bytes(line))
        prev = line
    return w, h, bpp, rows


def distinct_colours(png):
    w, h, bpp, rows = png_pixels(png)
    seen = set()
    for row in rows[::3]:
        for x in range(0, w * bpp, bpp * 3):
            seen.add(row[x:x + 3])
    return w, h, len(seen)


# In the page: every figure the markup announces, and whether each was drawn.
CHECK_JS = r"""(function () {
  var out = {canvases: 0, drawn: 0, blank: [], heat_tables: 0, heat_cells_painted: 0,
             heat_cells: 0, alloc_tables: 0, alloc_cells: 0, alloc_cells_painted: 0,
             alloc_expected: JSON.parse(document.getElementById('kvt-data').textContent)
                                 .alloc.length,
             alloc_ok: document.body.dataset.allocHeatmapsOk || null, imgs: 0, imgs_broken: [], figures: 0, remote: [],
             charts_ok: document.body.dataset.chartsOk || null,
             curves_none: !!document.getElementById('curves-none'),
             heatmaps_ok: document.body.dataset.heatmapsOk || null,
             js_errors: document.getElementById('js-errors').textContent,
             kvt_errors: (window.kvtErrors || []).slice(),
             no_chartjs: !!document.getElementById('no-chartjs'),
             title: document.title, h1: document.querySelector('h1').textContent,
             scripts: document.scripts.length,
             x_imgs: document.querySelectorAll('img[src="x"], img:not([src^="data:"])').length,
             text_only_note: !!document.getElementById('modality-text-only'),
             captions: Array.prototype.map.call(document.querySelectorAll('.hm figcaption'),
                                                function (e) { return e.textContent; })};
  document.querySelectorAll('canvas').forEach(function (c) {
    out.canvases++;
    if (c.dataset.rendered !== '1') { out.blank.push(c.id + ' (not rendered)'); return; }
    var d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data, n = 0;
    for (var i = 3; i < d.length; i += 4 * 7) if (d[i]) n++;
    if (n < 200) out.blank.push(c.id + ' (' + n + ' painted samples)'); else out.drawn++;
  });
  document.querySelectorAll('#heatmaps table.heat').forEach(function (t) {
    out.heat_tables++;
    t.querySelectorAll('td').forEach(function (td) {
      out.heat_cells++;
      if (td.style.background && td.title.indexOf(' = ') > 0) out.heat_cells_painted++;
    });
  });
  document.querySelectorAll('#alloc-heatmaps table.heat').forEach(function (t) {
    out.alloc_tables++;
    t.querySelectorAll('td').forEach(function (td) {
      out.alloc_cells++;
      if (td.style.background && / kept/.test(td.title) && !/n\/a/.test(td.title))
        out.alloc_cells_painted++;
    });
  });
  document.querySelectorAll('img').forEach(function (im) {
    out.imgs++;
    if (!(im.complete && im.naturalWidth > 0)) out.imgs_broken.push(im.alt);
  });
  out.figures = document.querySelectorAll('figure').length;
  document.querySelectorAll('[src],[href]').forEach(function (e) {
    var u = e.getAttribute('src') || e.getAttribute('href');
    if (/^[a-z]+:/i.test(u) && !/^data:/i.test(u)) out.remote.push(u);
  });
  return out;
})()"""


POINT_JS = r"""(function () {
  var c = document.querySelector('canvas'), ch = window.Chart.getChart(c);
  c.scrollIntoView({block: 'center'});
  var r = c.getBoundingClientRect(), meta = ch.getDatasetMeta(1), pt = meta.data[1];
  return {x: r.left + pt.x, y: r.top + pt.y, label: ch.data.datasets[1].label};
})()"""

TOOLTIP_JS = r"""(function () {
  var ch = window.Chart.getChart(document.querySelector('canvas')), t = ch.tooltip;
  if (!t.getActiveElements().length) return '';
  return t.body.map(function (b) { return b.lines.join(' '); }).join(' | ');
})()"""


def hover_check(b, problems):
    """A real mouse move onto a point of the first chart must show its value in a tooltip."""
    pt = b.eval(POINT_JS)
    for kind in ("mouseMoved",):
        b.send("Input.dispatchMouseEvent", {"type": kind, "x": pt["x"], "y": pt["y"]})
    text = b.wait_for(TOOLTIP_JS, timeout=5)
    if not text or pt["label"] not in text or " = " not in text:
        problems.append("hover on %s shows no value tooltip (%r)" % (pt["label"], text))
    print("browser: hover tooltip: %s" % text)


def main():
    argv = sys.argv[1:]
    chromium, page = argv[0], os.path.abspath(argv[1])
    no_chartjs = "--no-chartjs" in argv
    hostile = argv[argv.index("--hostile") + 1] if "--hostile" in argv else None
    shot = argv[argv.index("--screenshot") + 1] if "--screenshot" in argv else None
    problems = []
    with tempfile.TemporaryDirectory() as profile:
        b = Browser(chromium, profile)
        try:
            t = b.send("Target.createTarget", {"url": "about:blank"}, session=False)
            a = b.send("Target.attachToTarget", {"targetId": t["targetId"], "flatten": True},
                       session=False)
            b.session = a["sessionId"]
            for dom in ("Page", "Runtime", "Network", "Log"):
                b.send(dom + ".enable")
            b.send("Emulation.setDeviceMetricsOverride",
                   {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False})
            b.send("Page.navigate", {"url": "file://" + page})
            done = b.wait_for("document.readyState === 'complete' && "
                              "document.body && document.body.dataset.chartsOk !== undefined",
                              timeout=60)
            if not done:
                problems.append("the page script never finished (no data-charts-ok)")
            b.pump(1.0)
            info = b.eval(CHECK_JS)
            if shot or True:
                r = b.send("Page.captureScreenshot", {"format": "png"})
                png = base64.b64decode(r["data"])
                if shot:
                    with open(shot, "wb") as f:
                        f.write(png)
                w, h, n = distinct_colours(png)
                if n < 50:
                    problems.append("screenshot %dx%d has only %d colours" % (w, h, n))
            if not no_chartjs and info["drawn"]:
                hover_check(b, problems)
            # one heatmap budget switch: the cells must repaint without errors
            b.eval("(function(){var s=document.getElementById('heat-budget');"
                   "if(!s)return;s.value='0';s.dispatchEvent(new Event('change'));})()")
            if info["heat_tables"] and b.eval("document.body.dataset.heatBudget") != "0":
                problems.append("the budget <select> does not repaint the heatmaps")
            b.eval("(function(){var s=document.getElementById('alloc-budget');"
                   "if(!s)return;s.value='0';s.dispatchEvent(new Event('change'));})()")
            if info["alloc_tables"] and b.eval("document.body.dataset.allocBudget") != "0":
                problems.append("the budget <select> does not repaint the allocation heatmaps")
            # one colour scale for the allocation tables of one kind of head (KV heads, or the
            # query heads of heads=query policies): their colour bars say the same largest count
            bars = b.eval("JSON.stringify(Array.from(document.querySelectorAll("
                          "'#alloc-heatmaps .cbar-slot')).map(function(x){"
                          "return [x.dataset.heads, x.textContent];}))")
            bars = json.loads(bars) if bars else []
            for kind in set(k for k, _ in bars):
                scales = set(t for k, t in bars if k == kind)
                if len(scales) > 1:
                    problems.append("allocation heatmaps of %ss on different colour scales: %s"
                                    % (kind, sorted(scales)))
            b.pump(0.3)
        finally:
            b.close()

    for e in b.events:
        m, p = e["method"], e.get("params", {})
        if m == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            problems.append("uncaught: %s" % (d.get("exception", {}).get("description")
                                              or d.get("text")))
        elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            problems.append("console.%s: %s" % (p["type"], [x.get("value", x.get("description"))
                                                             for x in p.get("args", [])]))
        elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
            problems.append("log error: %s" % p["entry"].get("text"))
        elif m == "Page.javascriptDialogOpening":
            problems.append("a %s dialog opened: %r" % (p.get("type"), p.get("message")))
        elif m == "Network.requestWillBeSent":
            url = p["request"]["url"]
            if not (url.startswith("file:") or url.startswith("data:")):
                problems.append("network request: %s" % url)

    if info["js_errors"] or info["kvt_errors"]:
        problems.append("page script errors: %r %r" % (info["js_errors"], info["kvt_errors"]))
    if info["remote"]:
        problems.append("non-data src/href: %s" % info["remote"])
    if info["x_imgs"]:
        problems.append("%d <img> not from a data: URI (injected?)" % info["x_imgs"])
    if info["imgs_broken"]:
        problems.append("PNG figures that do not decode: %s" % info["imgs_broken"])
    if info["blank"]:
        problems.append("canvases not drawn or blank: %s" % info["blank"])
    if no_chartjs:
        if not info["no_chartjs"]:
            problems.append("no note saying Chart.js is missing")
        if info["canvases"] or info["charts_ok"] != "0":
            problems.append("canvases without Chart.js: %s" % info["canvases"])
    else:
        if info["no_chartjs"]:
            problems.append("the page says Chart.js is missing")
        # no canvas only where the page says there is nothing to plot (only `full`)
        if (info["canvases"] == 0 and not info["curves_none"]) or \
                str(info["drawn"]) != info["charts_ok"]:
            problems.append("charts: %s canvases, %s drawn, page says %s" %
                            (info["canvases"], info["drawn"], info["charts_ok"]))
    if info["heat_tables"] == 0 or str(info["heat_tables"]) != info["heatmaps_ok"] or \
            info["heat_cells_painted"] != info["heat_cells"]:
        problems.append("heatmaps: %s tables (page says %s), %s of %s cells painted" %
                        (info["heat_tables"], info["heatmaps_ok"], info["heat_cells_painted"],
                         info["heat_cells"]))
    if info["alloc_tables"] != info["alloc_expected"] or \
            str(info["alloc_tables"]) != info["alloc_ok"] or \
            info["alloc_cells_painted"] != info["alloc_cells"]:
        problems.append("allocation heatmaps: %s tables of %s (page says %s), %s of %s cells "
                        "painted" % (info["alloc_tables"], info["alloc_expected"],
                                     info["alloc_ok"], info["alloc_cells_painted"],
                                     info["alloc_cells"]))
    if hostile is not None:
        if hostile not in info["title"] or hostile not in info["h1"]:
            problems.append("hostile name not shown as text: title %r, h1 %r" %
                            (info["title"], info["h1"]))
        if hostile + "snapkv" not in info["captions"]:
            problems.append("hostile policy label not a heatmap caption: %r" % info["captions"])
    expected_scripts = 3 if no_chartjs else 4  # error hook, JSON data, [Chart.js], page script
    if info["scripts"] != expected_scripts:
        problems.append("%d script elements, want %d" % (info["scripts"], expected_scripts))
    summary = dict((k, info[k]) for k in ("canvases", "drawn", "heat_tables", "heat_cells",
                                          "alloc_tables", "alloc_cells", "imgs", "figures",
                                          "scripts"))
    print("browser: %s %s" % (os.path.basename(os.path.dirname(page)), summary))
    for p in problems:
        print("FAILED: " + p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
