"""``vitkit serve`` under concurrent uploads: every request answered, memory bounded.

A short run of ``configs/mnist_nest.yaml`` (the recipe's NesT, trained for one epoch on 2,000 real MNIST digits:
the weights only need to be a real run's) is served by ``vitkit serve`` in its own process (one torch thread,
the default limits: one computation at a time, 4 waiting, 10 MiB per upload). A local load script then sends:

* **burst**: 20 uploads of different held-out MNIST digits (PNG) at once, no retries: each is answered with a
  prediction (200) or at once with 503 + ``Retry-After``;
* **burst, retrying**: 20 clients at once that honour ``Retry-After`` until they get their prediction;
* **large burst**: 20 uploads at once of a 2048x2048 noise PNG (4 MiB each; decoded one at a time);
* **rounds**: 10 more bursts of 20 (200 requests), the server's RSS read after each.

Recorded: requests, answers by status, p50/p95 latency (all answers, and the 200s), the server process's peak RSS
(``VmHWM`` from /proc, the kernel's own high-water mark) and RSS after each phase, and the CPU line.

    python benchmarks/serve/run.py                # about 2 minutes on 2 cores; writes results.json beside itself
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RECIPE = REPO / "configs" / "mnist_nest.yaml"


def train(run: Path, mnist: Path) -> Path:
    """One epoch of the recipe on the first 2,000 digits (skipped when the run exists)."""
    if (run / "checkpoints" / "best" / "model.safetensors").is_file():
        return run
    sets = [f"data.root={mnist}", "data.train_split=test[:2000]", "data.val_split=test[9000:]", "sched.epochs=1",
            "sched.warmup_epochs=0", "train.progress=false", "train.threads=1", f"train.output={run}"]  # fmt: skip
    cmd = [sys.executable, "-m", "vitkit", "train", "--config", str(RECIPE)] + sum([["--set", s] for s in sets], [])
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return run


def start_server(run: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "vitkit", "serve", str(run), "--port", "0"]
    log = open(run / "serve.log", "w")  # the server's stderr, for a post-mortem
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    line = proc.stdout.readline()  # "vitkit serve: <model> at http://127.0.0.1:PORT/"
    if " at http" not in line:
        proc.kill()
        raise RuntimeError(f"vitkit serve did not start: {line!r}")
    return proc, line.rsplit(" at ", 1)[1].strip()


def memory(pid: int) -> dict:
    """RSS now and its high-water mark (VmHWM: the kernel's peak) in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: round(int(fields[v].split()[0]) / 1024, 1) for k, v in [("rss_mib", "VmRSS"), ("peak_rss_mib", "VmHWM")]}


def post(url: str, data: bytes, retry: bool) -> dict:
    t0, refused = time.perf_counter(), 0
    while True:
        req = urllib.request.Request(url + "api/images", data=data, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                json.loads(r.read())
                return {"status": r.status, "s": time.perf_counter() - t0, "refused_first": refused}
        except urllib.error.HTTPError as e:
            after = e.headers.get("Retry-After")
            e.read()
            if e.code == 503 and after is None:
                return {"status": 503, "s": time.perf_counter() - t0, "error": "503 without Retry-After"}
            if e.code == 503 and retry:
                refused += 1
                time.sleep(float(after))
                continue
            return {"status": e.code, "s": time.perf_counter() - t0, "retry_after": after, "refused_first": refused}
        except OSError as e:  # no answer at all (connection refused or reset, timeout)
            return {"status": None, "s": time.perf_counter() - t0, "error": repr(e)}


def burst(url: str, bodies: list[bytes], retry: bool = False) -> list[dict]:
    """All ``bodies`` posted at once (a barrier releases the threads together)."""
    out: list[dict] = [None] * len(bodies)
    go = threading.Barrier(len(bodies))

    def client(i: int) -> None:
        go.wait()
        out[i] = post(url, bodies[i], retry)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def summary(results: list[dict]) -> dict:
    def pct(xs, q):
        return round(float(np.percentile(xs, q)) * 1000, 1) if xs else None

    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    every = [r["s"] for r in results if r["status"] is not None]
    ok = [r["s"] for r in results if r["status"] == 200]
    return {
        "requests": len(results),
        "answered": len(every),
        "by_status": statuses,
        "refused_then_retried": sum(r.get("refused_first", 0) for r in results),
        "p50_ms": pct(every, 50),
        "p95_ms": pct(every, 95),
        "p50_ms_200": pct(ok, 50),
        "p95_ms_200": pct(ok, 95),
        "max_ms": pct(every, 100),
        "errors": sorted({r["error"] for r in results if "error" in r}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mnist", type=Path, default=REPO.parent / "shared" / "data" / "mnist")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "serve-bench")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", type=Path, default=HERE / "results.json")
    args = ap.parse_args()

    from vitkit.config import load_config
    from vitkit.data.mnist import MNIST
    from vitkit.machine import cpu_line

    run = train(args.work / "nest", args.mnist)
    digits = MNIST(args.mnist, "test")
    bodies = []
    for i in range(args.clients):
        buf = io.BytesIO()
        Image.fromarray(digits.images[9000 + i]).save(buf, format="PNG")
        bodies.append(buf.getvalue())
    noise = np.random.default_rng(0).integers(0, 256, (2048, 2048), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    large = buf.getvalue()

    proc, url = start_server(run)
    try:
        phases = {"idle": memory(proc.pid)}
        post(url, bodies[0], retry=False)  # first request warms the model
        phases["after_one_request"] = memory(proc.pid)
        t0 = time.perf_counter()
        res = {"burst": summary(burst(url, bodies))}
        phases["after_burst"] = memory(proc.pid)
        res["burst_retrying"] = summary(burst(url, bodies, retry=True))
        phases["after_burst_retrying"] = memory(proc.pid)
        res["large_burst"] = dict(summary(burst(url, [large] * args.clients)), upload_bytes=len(large))
        phases["after_large_burst"] = memory(proc.pid)
        rounds, rss = [], []
        for _ in range(args.rounds):
            rounds += burst(url, bodies)
            rss.append(memory(proc.pid)["rss_mib"])
        res["rounds"] = dict(summary(rounds), rounds=args.rounds, rss_mib_after_each=rss)
        phases["end"] = memory(proc.pid)
        seconds = time.perf_counter() - t0
        alive = proc.poll() is None and urllib.request.urlopen(url + "api/info", timeout=10).status == 200
    finally:
        proc.terminate()
        proc.wait(10)

    out = {
        "command": "python benchmarks/serve/run.py",
        "cpu": cpu_line(),
        "python": platform.python_version(),
        "note": "2 CPU cores shared with other jobs while this ran: latencies are disturbed by their load",
        "server": f"vitkit serve {run} (default limits: 1 computing, 4 waiting, 10 MiB uploads, 4096x4096 pixels); "
        "OMP_NUM_THREADS=1",
        "model": f"{load_config(run / 'config.yaml').model.name} (configs/mnist_nest.yaml), 1 epoch on 2,000 digits",
        "clients": args.clients,
        "load_seconds": round(seconds, 1),
        "server_still_serving": alive,
        "memory": phases,
        **res,
    }
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
