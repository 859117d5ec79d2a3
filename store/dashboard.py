"""A live web dashboard of a cluster (the optional ``claypot[dashboard]`` extra).

One page, plain HTML and JavaScript, that asks ``/api/state`` once a second
and redraws in place: each backend with up/down, objects (resident and
spilled), memory and call rate, tasks running / done / failed; the largest
objects and where they live; and, when the dashboard runs inside the program
that submits tasks, that program's task graph with each task's state and a
progress bar.

    python -m store.dashboard [--address HOST:PORT --token T] [--host H] [--port P]

Without ``--address`` it connects to the cluster ``claypot up`` started (its
state file). From a program, :func:`serve` runs it in a background thread::

    server = store.dashboard.serve(port=8787)   # server.url; server.stop()

Call rates and task counts come from each backend's Prometheus metrics
(:mod:`store.metrics`); a backend with metrics off shows objects and memory
only. The page has no login: it listens on loopback unless told otherwise
(``allow_network=True`` / ``--insecure``).
"""

from __future__ import annotations

from typing import Any
import logging
import socket
import threading
import time
import urllib.request

from .errors import ClaypotError, ConfigurationError

log = logging.getLogger("claypot.dashboard")

LARGEST = 10  # objects listed per backend, then the largest overall kept
SCRAPE_TIMEOUT = 2.0  # seconds a backend's metrics page may take


def largest_here(n: int) -> list[dict]:
    """Runs inside a backend, as a task: its ``n`` largest objects."""
    from store._model import objects

    heap = getattr(objects.get_dispatcher(), "local", None)
    return heap.largest(n) if heap is not None else []


def _scrape(address: str) -> dict[str, float]:
    """The few totals the page shows, from a backend's metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=SCRAPE_TIMEOUT) as r:
        text = r.read().decode()
    out = {"calls": 0.0, "errors": 0.0, "tasks_done": 0.0, "tasks_failed": 0.0, "tasks_queued": 0.0, "disk_bytes": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "claypot_calls_total":
                out["calls"] += s.value
                if s.labels.get("outcome") == "error":
                    out["errors"] += s.value
            elif s.name == "claypot_tasks_total":
                out["tasks_" + s.labels.get("outcome", "done")] = s.value
            elif s.name == "claypot_tasks_now":
                out["tasks_" + s.labels.get("state", "queued")] = s.value
            elif s.name == "claypot_disk_bytes":
                out["disk_bytes"] = s.value
    return out


class Dashboard:
    """What the page shows, gathered from a client's cluster (and this process's runtime)."""

    def __init__(self, client):
        self.client = client
        self._last: dict[str, tuple[float, float]] = {}  # backend -> (time, calls)
        self._largest_key: str | None = None
        self._lock = threading.Lock()

    def state(self) -> dict:
        """The page's data: backends, largest objects, tasks (see the module docstring)."""
        with self._lock:  # call rates are differences between two consecutive asks
            now = time.monotonic()
            backends = []
            for b in self.client.backends():
                row = {
                    "backend_id": b.backend_id,
                    "address": b.address,
                    "host": b.host,
                    "up": b.up,
                    "objects": b.objects,
                    "resident_objects": b.resident_objects,
                    "memory_bytes": b.memory_bytes,
                    "running_tasks": b.running_tasks,
                    "metrics_address": b.metrics_address,
                    "call_rate": None,
                }
                if b.up and b.metrics_address:
                    try:
                        m = _scrape(b.metrics_address)
                    except (OSError, ValueError) as exc:
                        log.info("metrics of %s unreadable: %s", b.backend_id, exc)
                    else:
                        row.update(
                            calls=m["calls"],
                            errors=m["errors"],
                            tasks_done=m["tasks_done"],
                            tasks_failed=m["tasks_failed"],
                            tasks_queued=m["tasks_queued"],
                            disk_bytes=m["disk_bytes"],
                            # fresher than the heartbeat's figure
                            running_tasks=int(m.get("tasks_running", b.running_tasks)),
                        )
                        prev = self._last.get(b.backend_id)
                        if prev is not None and now > prev[0]:
                            row["call_rate"] = round((m["calls"] - prev[1]) / (now - prev[0]), 1)
                        self._last[b.backend_id] = (now, m["calls"])
                backends.append(row)
            return {
                "time": time.time(),
                "backends": backends,
                "largest": self._largest([r for r in backends if r["up"]]),
                "tasks": self._tasks(),
            }

    def _largest(self, backends: list[dict]) -> list[dict]:
        if self._largest_key is None:
            self._largest_key = self.client.register_code(largest_here)
        out = []
        for b in backends:
            try:
                rows = self.client.run_task(
                    b["backend_id"], self._largest_key, (LARGEST,), {}, [], timeout=SCRAPE_TIMEOUT
                )
            except ClaypotError as exc:
                log.info("largest objects of %s unknown: %s", b["backend_id"], exc)
                continue
            out.extend(dict(r, backend_id=b["backend_id"]) for r in rows)
        out.sort(key=lambda r: -r["bytes"])
        return out[:LARGEST]

    def _tasks(self) -> dict | None:
        try:
            from runtime import _core as core
        except ImportError:
            return None
        rt = core._runtime
        if rt is None or rt.inline or rt.client is not self.client:
            return None
        return rt.snapshot()


class DashboardServer:
    """A dashboard served by uvicorn in a background thread (see :func:`serve`)."""

    def __init__(self, server: Any, thread: threading.Thread, url: str) -> None:
        self._server = server
        self._thread = thread
        self.url = url

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and wait (at most ``timeout`` seconds) for the thread to end."""
        self._server.should_exit = True
        self._thread.join(timeout)


def make_app(dashboard: Dashboard) -> Any:
    """The Starlette application: the page and its JSON."""
    try:
        from starlette.applications import Starlette
        from starlette.responses import HTMLResponse, JSONResponse
        from starlette.routing import Route
    except ImportError:
        raise ConfigurationError(
            "the dashboard needs starlette and uvicorn: pip install 'claypot[dashboard]'"
        ) from None

    def page(request):
        return HTMLResponse(PAGE)

    def api_state(request):  # a plain def: Starlette runs it in a worker thread
        try:
            return JSONResponse(dashboard.state())
        except ClaypotError as exc:
            return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=503)

    return Starlette(routes=[Route("/", page), Route("/api/state", api_state)])


def _listen(host: str, port: int, allow_network: bool) -> socket.socket:
    from store._util.security import is_loopback_host

    if not allow_network and not is_loopback_host(host):
        raise ConfigurationError(
            f"refusing to serve the dashboard on {host}: it has no login "
            f"and shows the whole cluster (pass --insecure to accept that)"
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigurationError(f"cannot serve the dashboard on {host}:{port}: {exc}") from None
    return sock


def serve(
    client: Any = None, host: str = "127.0.0.1", port: int = 8787, allow_network: bool = False, background: bool = True
) -> DashboardServer | None:
    """Serve the dashboard of ``client``'s cluster (default: this process's connection).

    ``background=True`` returns a :class:`DashboardServer` at once (its
    ``url``; ``stop()``); otherwise it serves until interrupted. ``port=0``
    picks a free port.
    """
    try:
        import uvicorn
    except ImportError:
        raise ConfigurationError(
            "the dashboard needs starlette and uvicorn: pip install 'claypot[dashboard]'"
        ) from None
    if client is None:
        from store._api import api

        client = api.client()
    app = make_app(Dashboard(client))
    sock = _listen(host, port, allow_network)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{bound}/"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    if not background:
        print(f"claypot dashboard on {url}", flush=True)
        server.run(sockets=[sock])
        return None
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="dashboard", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise ClaypotError("the dashboard did not start")
        time.sleep(0.02)
    return DashboardServer(server, thread, url)


def main(argv: list[str] | None = None) -> None:
    """``python -m store.dashboard``: serve the dashboard until interrupted."""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m store.dashboard", description="Serve a live web dashboard of a claypot cluster."
    )
    p.add_argument("--address", help="a backend host:port (default: the cluster of `claypot up`)")
    p.add_argument("--token", help="the cluster token (default: CLAYPOT_TOKEN or the state file)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve the page on")
    p.add_argument("--port", type=int, default=8787, help="port to serve on (0: any free one)")
    p.add_argument("--insecure", action="store_true", help="serve a non-loopback address (the page has no login)")
    a = p.parse_args(argv)
    from store._api import api

    client = api.connect(a.address, a.token)
    serve(client, a.host, a.port, allow_network=a.insecure, background=False)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>claypot dashboard</title>
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .2em} h2{font-size:1.05em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff} td,th{padding:.3em .7em;border:1px solid #ddd;
text-align:right} th{background:#eee} td.l,th.l{text-align:left}
.up{color:#1a7f37;font-weight:600} .down{color:#c62828;font-weight:600}
#status{color:#666;font-size:.9em} .bar{width:24em;height:1em;background:#ddd;display:inline-block;
vertical-align:middle} .bar span{display:block;height:100%;background:#1a7f37}
svg text{font-size:10px} .waiting{fill:#bbb} .queued{fill:#f0c419} .running{fill:#1e88e5}
.done{fill:#1a7f37} .failed{fill:#c62828}
</style></head><body>
<h1>claypot</h1><div id="status">connecting&hellip;</div>
<h2>Backends</h2>
<table id="backends"><thead><tr><th class="l">backend</th><th class="l">address</th>
<th class="l">state</th><th>objects</th><th>resident</th><th>memory</th><th>disk</th>
<th>calls</th><th>calls/s</th><th>tasks running</th><th>done</th><th>failed</th></tr></thead>
<tbody></tbody></table>
<h2>Largest objects</h2>
<table id="largest"><thead><tr><th class="l">object</th><th class="l">class</th>
<th class="l">alias</th><th>size</th><th class="l">state</th><th class="l">backend</th></tr></thead>
<tbody></tbody></table>
<h2>Tasks</h2><div id="tasks">no program's tasks here (the dashboard shows the task graph
of the program it runs in)</div><svg id="graph" width="0" height="0"></svg>
<script>
"use strict";
function fmtBytes(n){if(n==null)return "";const u=["B","KiB","MiB","GiB","TiB"];let i=0;
 while(n>=1024&&i<u.length-1){n/=1024;i++}return (i?n.toFixed(1):n)+" "+u[i]}
function fmt(n){return n==null?"":String(Math.round(n*10)/10)}
function cell(row,text,cls){const td=document.createElement("td");td.textContent=text;
 if(cls)td.className=cls;row.appendChild(td);return td}
function fill(id,rows,make){const body=document.querySelector("#"+id+" tbody");
 body.replaceChildren();for(const r of rows){const tr=document.createElement("tr");make(tr,r);
 body.appendChild(tr)}}
function drawTasks(t){const box=document.getElementById("tasks");
 const svg=document.getElementById("graph");svg.replaceChildren();
 if(!t){svg.setAttribute("width",0);svg.setAttribute("height",0);return}
 const fin=t.done+t.failed,pct=t.submitted?Math.round(100*fin/t.submitted):100;
 box.innerHTML="";const p=document.createElement("div");
 p.innerHTML='<span class="bar"><span style="width:'+pct+'%"></span></span> ';
 const s=document.createElement("span");s.id="task-counts";
 s.textContent=fin+"/"+t.submitted+" finished: "+t.done+" done, "+t.failed+" failed, "+
  t.pending+" pending";p.appendChild(s);box.appendChild(p);
 const byId=new Map(t.tasks.map(x=>[x.id,x])),level=new Map();
 function lv(x){if(level.has(x.id))return level.get(x.id);level.set(x.id,0);let l=0;
  for(const d of x.after){const y=byId.get(d);if(y)l=Math.max(l,lv(y)+1)}level.set(x.id,l);return l}
 const cols=new Map();for(const x of t.tasks){const l=lv(x);if(!cols.has(l))cols.set(l,[]);
  cols.get(l).push(x)}
 const W=130,H=22,pos=new Map();let maxRows=0;
 for(const [l,xs] of cols){xs.forEach((x,i)=>pos.set(x.id,[10+l*W,10+i*H]));
  maxRows=Math.max(maxRows,xs.length)}
 svg.setAttribute("width",20+cols.size*W);svg.setAttribute("height",20+maxRows*H);
 const NS="http://www.w3.org/2000/svg";
 for(const x of t.tasks)for(const d of x.after){const a=pos.get(d),b=pos.get(x.id);if(!a)continue;
  const ln=document.createElementNS(NS,"line");ln.setAttribute("x1",a[0]+110);
  ln.setAttribute("y1",a[1]+8);ln.setAttribute("x2",b[0]);ln.setAttribute("y2",b[1]+8);
  ln.setAttribute("stroke","#999");svg.appendChild(ln)}
 for(const x of t.tasks){const [px,py]=pos.get(x.id);const r=document.createElementNS(NS,"rect");
  r.setAttribute("x",px);r.setAttribute("y",py);r.setAttribute("width",110);
  r.setAttribute("height",16);r.setAttribute("rx",3);r.setAttribute("class","task "+x.state);
  const tt=document.createElementNS(NS,"title");tt.textContent=x.name+": "+x.state+
  (x.backend?" on "+x.backend.slice(0,8):"");r.appendChild(tt);svg.appendChild(r);
  const tx=document.createElementNS(NS,"text");tx.setAttribute("x",px+4);tx.setAttribute("y",py+12);
  tx.setAttribute("fill","#fff");tx.textContent=x.name.slice(0,18);svg.appendChild(tx)}}
async function tick(){try{const r=await fetch("api/state",{cache:"no-store"});
 const s=await r.json();if(s.error)throw new Error(s.error);
 fill("backends",s.backends,(tr,b)=>{tr.dataset.backend=b.backend_id;
  cell(tr,b.backend_id.slice(0,12),"l");cell(tr,b.address,"l");
  cell(tr,b.up?"up":"down",b.up?"l up":"l down");cell(tr,b.objects).className="objects";
  cell(tr,b.resident_objects);cell(tr,fmtBytes(b.memory_bytes));cell(tr,fmtBytes(b.disk_bytes));
  cell(tr,fmt(b.calls)).className="calls";cell(tr,fmt(b.call_rate));cell(tr,b.running_tasks);
  cell(tr,fmt(b.tasks_done)).className="tasks-done";cell(tr,fmt(b.tasks_failed))});
 fill("largest",s.largest,(tr,o)=>{cell(tr,o.object_id.slice(0,12),"l");
  cell(tr,o.class_key,"l");cell(tr,o.alias,"l");cell(tr,fmtBytes(o.bytes));cell(tr,o.state,"l");
  cell(tr,o.backend_id.slice(0,12),"l")});
 drawTasks(s.tasks);
 document.getElementById("status").textContent="updated "+new Date(s.time*1000).toLocaleTimeString();
 }catch(e){document.getElementById("status").textContent="cannot reach the cluster: "+e.message}
 setTimeout(tick,1000)}
tick();
</script></body></html>
"""


__all__ = ["Dashboard", "DashboardServer", "serve", "make_app", "largest_here", "main"]


if __name__ == "__main__":
    main()
