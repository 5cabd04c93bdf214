"""The run's status page: what the pipeline is doing, live, on PORT (7860 in a Space), and the feed
that tells it.

    python3 status_page.py serve --port 7860 --dir STATUS_DIR   # trainer.sh starts it first thing
    python3 status_page.py emit --dir STATUS_DIR KEY=VALUE ...  # trainer.sh's own events

`GET /` is a self-contained HTML page (no external asset: it works offline) that polls
`GET /status.json` every two seconds: stage, run, shard k of n, step of steps, tokens/s, elapsed
and ETA for the shard and the pipeline, a loss plot (training and validation loss against tokens,
drawn as inline SVG), the history of finished runs, the last publish and the next run, and at the
top any failure with its fix, as the log says it. Nothing else is served and nothing can be changed
(every other method is refused).

The feed is one file, STATUS_DIR/events.jsonl: each stage appends one JSON object per event
(`emit`, here, stdlib only so every stage and trainer.sh can call it cheaply). Every event passes
through the secret mask first. The server folds the events into the status (`fold`) on each
request; it imports nothing heavy, so it answers within a second of the container's start.

/status.json (all keys always present; null when not known yet):
  state         "starting" | "running" | "done" | "failed" | "stopped"
  phase         the phase under way (preflight, validate setup, prep, train, publish) or null
  run           the run number of this container (1, 2, ...)
  stage, shard, shards_total    what this run trains ("pretrain" | "instruct", k, n)
  step, max_steps, tokens, tokens_per_s, loss, learning_rate      the last training log
  elapsed_s     seconds since the container started
  shard_elapsed_s, shard_eta_s  this shard's training time so far and its estimate to the end
  pipeline_eta_s                 the shards left (this stage and the next) at this shard's pace
  train_curve, val_curve         [[tokens, loss], ...] of this shard
  history       the record's history (one object per finished run: stage, shard, steps, tokens,
                eval_loss_before, eval_loss, finished_at)
  last_publish  {"where", "url", "summary", "at"} or null
  next_run      what the next run does, in words, or null
  failure       {"phase", "message"} or null: the failure and its fix, as printed
  events        how many events were read
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

STATUS_DIR_VAR = "TRAIN_LLAMA_STATUS_DIR"  # set by trainer.sh for every stage it starts
EVENTS = "events.jsonl"


# --- the feed ---------------------------------------------------------------------------------------


def emit(kind: str, status_dir: str | None = None, **fields: Any) -> None:
    """Append one event to the feed (a no-op when no status page runs: STATUS_DIR unset)."""
    where = status_dir or os.environ.get(STATUS_DIR_VAR)
    if not where:
        return
    import redact

    line = redact.mask(json.dumps({"t": time.time(), "kind": kind, **fields}, default=str))
    try:
        with open(Path(where) / EVENTS, "a") as f:
            f.write(line + "\n")
    except OSError:
        pass  # the page is a view: a full disk must not fail the run through it


def read_events(status_dir: Path) -> list[dict[str, Any]]:
    try:
        lines = (status_dir / EVENTS).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written right now
    return out


def fold(events: list[dict[str, Any]], now: float | None = None) -> dict[str, Any]:
    """The status (the schema in this module's docstring) from the events, in order."""
    now = time.time() if now is None else now
    st: dict[str, Any] = {k: None for k in (
        "phase", "run", "stage", "shard", "shards_total", "step", "max_steps", "tokens", "tokens_per_s", "loss",
        "learning_rate", "elapsed_s", "shard_elapsed_s", "shard_eta_s", "pipeline_eta_s", "last_publish", "next_run",
        "failure")}
    st.update({"state": "starting", "train_curve": [], "val_curve": [], "history": [], "events": len(events)})
    started = train_started = None
    first_step = 0
    for e in events:
        kind = e.get("kind")
        if kind == "start":
            started = e["t"]
        elif kind == "run":
            st.update(run=e.get("run"), state="running", train_curve=[], val_curve=[], step=None, max_steps=None,
                      tokens=None, loss=None, tokens_per_s=None, shard_eta_s=None, shard_elapsed_s=None)
            train_started = None
        elif kind == "phase":
            st["phase"] = e.get("name")
            st["state"] = "running"
        elif kind == "phase_end":
            if e.get("rc", 0) != 0 and st["failure"] is None and not e.get("stopped"):
                st["failure"] = {"phase": e.get("name"), "message": f"{e.get('name')} failed with exit code {e.get('rc')}; "
                                 "the container log has the details."}
            st["phase"] = None
        elif kind == "plan":
            st.update({k: e.get(k) for k in ("stage", "shard", "shards_total")}, next_run=None)
        elif kind == "train_begin":
            train_started, first_step = e["t"], e.get("step") or 0
            st.update(max_steps=e.get("max_steps"), step=first_step)
        elif kind == "log":
            st.update({k: e[k] for k in ("step", "max_steps", "tokens", "tokens_per_s", "loss", "learning_rate") if k in e})
            if e.get("loss") is not None and e.get("tokens") is not None:
                st["train_curve"].append([e["tokens"], e["loss"]])
        elif kind == "eval":
            st["val_curve"].append([e.get("tokens") or 0, e.get("loss")])
        elif kind == "publish":
            st.update(last_publish={k: e.get(k) for k in ("where", "url", "summary")} | {"at": e["t"]},
                      history=e.get("history") or st["history"], next_run=e.get("next_run"))
        elif kind == "history":
            st["history"] = e.get("history") or []
        elif kind == "failure":
            st["failure"] = {"phase": e.get("phase") or st["phase"], "message": e.get("message")}
            st["state"] = "failed"
        elif kind == "end":
            st["state"] = e.get("state", "done")
            st["phase"] = None
            if e.get("message") and st["next_run"] is None:
                st["next_run"] = e["message"]
    if st["failure"] is not None:
        st["state"] = "failed"
    if started is not None:
        st["elapsed_s"] = round(now - started, 1)
    if train_started is not None and st["step"] and st["max_steps"]:
        done_steps = max(1, st["step"] - first_step)
        spent = now - train_started
        st["shard_elapsed_s"] = round(spent, 1)
        if st["state"] == "running":
            per_step = spent / done_steps
            st["shard_eta_s"] = round(per_step * (st["max_steps"] - st["step"]), 1)
            if st["shards_total"] is not None and st["shard"] is not None:
                left = st["shards_total"] - st["shard"] - 1  # shards after this one, this stage
                st["pipeline_eta_s"] = round(st["shard_eta_s"] + left * per_step * st["max_steps"], 1)
    return st


# --- the page -----------------------------------------------------------------------------------------

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>train-llama</title>
<style>
body{font:15px/1.45 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:14px 24px}header h1{font-size:19px;margin:0}
main{max-width:1000px;margin:0 auto;padding:18px 24px}
.card{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:14px 18px;margin-bottom:14px}
.failure{border-color:#d33;background:#fff4f4}.failure pre{white-space:pre-wrap;margin:6px 0 0}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:8px}
.k{color:#667;font-size:12px;text-transform:uppercase}.v{font-size:17px}
.bar{height:8px;background:#e3e6ec;border-radius:4px;overflow:hidden}.bar div{height:100%;background:#3b7}
table{border-collapse:collapse;width:100%}td,th{padding:4px 8px;border-bottom:1px solid #eee;text-align:left}
#state{font-weight:600}svg text{font-size:11px;fill:#667}
</style></head><body>
<header><h1>train-llama &mdash; <span id="state">starting</span></h1></header>
<main>
<div id="failure" class="card failure" hidden><b>Failed in <span id="fphase"></span></b><pre id="fmsg"></pre></div>
<div class="card"><div id="doing">Waiting for the first event&hellip;</div>
<div class="bar" style="margin-top:8px"><div id="progress" style="width:0%"></div></div>
<div class="grid" style="margin-top:10px" id="grid"></div></div>
<div class="card"><b>Loss</b> <span class="k">training (blue) and validation (orange) loss against tokens</span>
<svg id="plot" viewBox="0 0 900 260" width="100%" role="img" aria-label="loss plot"></svg></div>
<div class="card"><b>Finished runs</b><table id="history"><thead><tr><th>stage</th><th>shard</th><th>steps</th>
<th>tokens</th><th>val. loss before</th><th>val. loss after</th><th>finished</th></tr></thead><tbody></tbody></table>
<p id="publish"></p><p id="next"></p></div>
</main>
<script>
function fmt(s){if(s==null)return"\\u2013";s=Math.round(s);var h=Math.floor(s/3600),m=Math.floor(s%3600/60),x=s%60;
 return(h?h+"h ":"")+(h||m?m+"m ":"")+x+"s";}
function num(x,d){return x==null?"\\u2013":(typeof x==="number"?x.toLocaleString(undefined,{maximumFractionDigits:d||0}):x);}
function el(t,a,txt){var e=document.createElementNS("http://www.w3.org/2000/svg",t);for(var k in a)e.setAttribute(k,a[k]);
 if(txt!=null)e.textContent=txt;return e;}
function plot(tr,va){var s=document.getElementById("plot");while(s.firstChild)s.removeChild(s.firstChild);
 var pts=tr.concat(va);if(!pts.length){s.appendChild(el("text",{x:20,y:130},"no loss logged yet"));return;}
 var x0=0,x1=Math.max.apply(null,pts.map(function(p){return p[0];}))||1,
     ys=pts.map(function(p){return p[1];}),y0=Math.min.apply(null,ys),y1=Math.max.apply(null,ys);
 if(y1-y0<1e-9){y1+=0.5;y0-=0.5;}var L=50,R=880,T=10,B=230;
 function X(v){return L+(v-x0)/(x1-x0)*(R-L);}function Y(v){return B-(v-y0)/(y1-y0)*(B-T);}
 s.appendChild(el("line",{x1:L,y1:B,x2:R,y2:B,stroke:"#999"}));s.appendChild(el("line",{x1:L,y1:T,x2:L,y2:B,stroke:"#999"}));
 for(var i=0;i<=4;i++){var v=y0+(y1-y0)*i/4;s.appendChild(el("text",{x:4,y:Y(v)+4},v.toFixed(2)));}
 s.appendChild(el("text",{x:R-120,y:252},num(x1)+" tokens"));
 function line(p,c,id){if(!p.length)return;var d=p.map(function(q,i){return(i?"L":"M")+X(q[0]).toFixed(1)+" "+Y(q[1]).toFixed(1);}).join(" ");
  s.appendChild(el("path",{d:d,fill:"none",stroke:c,"stroke-width":2,id:id}));
  p.forEach(function(q){s.appendChild(el("circle",{cx:X(q[0]),cy:Y(q[1]),r:p.length>40?0:2.5,fill:c}));});}
 line(tr,"#2a6fdb","train-loss");line(va,"#f08a24","val-loss");}
function render(st){document.getElementById("state").textContent=st.state+(st.phase?" \\u2014 "+st.phase:"");
 var f=document.getElementById("failure");f.hidden=!st.failure;if(st.failure){document.getElementById("fphase").textContent=st.failure.phase||"the run";
  document.getElementById("fmsg").textContent=st.failure.message;}
 var d=st.stage?(st.stage+" shard "+(st.shard+1)+" of "+(st.shards_total||"?")+(st.run?" (run "+st.run+" of this container)":"")):"";
 if(st.step!=null&&st.max_steps)d+=" \\u2014 step "+st.step+" of "+st.max_steps;
 document.getElementById("doing").textContent=d||(st.state==="done"?"The pipeline is done.":"Starting\\u2026");
 document.getElementById("progress").style.width=(st.max_steps?100*st.step/st.max_steps:0)+"%";
 var g=[["tokens/s",num(st.tokens_per_s)],["loss",num(st.loss,3)],["tokens",num(st.tokens)],["elapsed",fmt(st.elapsed_s)],
  ["shard: elapsed",fmt(st.shard_elapsed_s)],["shard: ETA",fmt(st.shard_eta_s)],["stage: ETA",fmt(st.pipeline_eta_s)]];
 document.getElementById("grid").innerHTML=g.map(function(x){return'<div><div class="k">'+x[0]+'</div><div class="v">'+x[1]+"</div></div>";}).join("");
 plot(st.train_curve||[],st.val_curve||[]);
 var tb=document.querySelector("#history tbody");tb.innerHTML="";(st.history||[]).forEach(function(h){var r=document.createElement("tr");
  [h.stage,h.shard,num(h.steps),num(h.tokens),num(h.eval_loss_before,4),num(h.eval_loss,4),h.finished_at||""].forEach(function(c){
   var td=document.createElement("td");td.textContent=c;r.appendChild(td);});tb.appendChild(r);});
 var p=document.getElementById("publish");p.textContent="";if(st.last_publish){p.appendChild(document.createTextNode("Last publish: "));
  var a=document.createElement(st.last_publish.url?"a":"span");if(st.last_publish.url)a.href=st.last_publish.url;
  a.textContent=st.last_publish.where;p.appendChild(a);p.appendChild(document.createTextNode(" \\u2014 "+(st.last_publish.summary||"")));}
 document.getElementById("next").textContent=st.next_run?("Next: "+st.next_run):"";}
function tick(){fetch("status.json",{cache:"no-store"}).then(function(r){return r.json();}).then(render).catch(function(){})
 .finally(function(){setTimeout(tick,2000);});}
tick();
</script></body></html>
"""


class Handler(BaseHTTPRequestHandler):
    status_dir: Path = Path(".")
    server_version = "train-llama"

    def log_message(self, *args) -> None:  # the run's log is for the run
        pass

    def _send(self, code: int, body: bytes, ctype: str, head: bool = False) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _get(self, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            return self._send(200, PAGE.encode(), "text/html; charset=utf-8", head)
        if path == "/status.json":
            body = json.dumps(fold(read_events(self.status_dir))).encode()
            return self._send(200, body, "application/json", head)
        return self._send(404, b'{"error": "not found"}', "application/json", head)

    def do_GET(self) -> None:
        self._get(False)

    def do_HEAD(self) -> None:
        self._get(True)

    def _refuse(self) -> None:  # read-only: nothing on this page changes anything
        self._send(405, b'{"error": "read-only"}', "application/json")

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse


def serve(port: int, status_dir: Path, host: str = "0.0.0.0") -> None:
    status_dir.mkdir(parents=True, exist_ok=True)
    handler = type("BoundHandler", (Handler,), {"status_dir": status_dir})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    print(f"[status] page on http://localhost:{port}/ (status.json for scripts)", flush=True)
    server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="status_page.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sv = sub.add_parser("serve")
    sv.add_argument("--port", type=int, default=7860)
    sv.add_argument("--dir", required=True)
    em = sub.add_parser("emit")
    em.add_argument("--dir", required=True)
    em.add_argument("kind")
    em.add_argument("fields", nargs="*", help="KEY=VALUE (a VALUE that parses as JSON is taken as such)")
    args = ap.parse_args(argv)
    if args.command == "serve":
        try:
            serve(args.port, Path(args.dir))
        except OSError as e:
            print(f"[status] cannot serve the status page on port {args.port}: {e.strerror}. Fix: set PORT to a free "
                  "port. The run goes on without the page.", file=sys.stderr)
            return 1
        return 0
    fields = {}
    for kv in args.fields:
        k, _, v = kv.partition("=")
        try:
            fields[k] = json.loads(v)
        except json.JSONDecodeError:
            fields[k] = v
    emit(args.kind, args.dir, **fields)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
