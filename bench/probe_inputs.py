"""Feed bad inputs to both command lines and classify what each one does (issue 8).

    python bench/probe_inputs.py [--jobs 3] [--timeout 60] [--mem-limit-gb 4]

Every case runs ``python -m data_index ...`` or ``python -m explainer ...`` in a subprocess (with
``RLIMIT_DATA`` capped, so an unbounded allocation fails instead of swapping the machine) and
ends up as one of:

* ``clean``     exit status 2 and exactly one stderr line ``error: ...``, no traceback;
* ``traceback`` a Python traceback, or death by a signal / any other exit status;
* ``silent``    a bad input accepted: exit 0, or still working when the timeout killed it;
* ``messy``     exit 2 but not one ``error:`` line (e.g. argparse's usage block);
* ``ok`` / ``wrong``  for the few valid-but-extreme inputs that must *succeed* within bounds
  (``search -m 1000000000`` is capped at the number of crops; a build over a 1 000 000 x 16 px
  image; a build over a folder with an unlistable sub-folder records it in ``skipped``).

The inputs: the issue's list (seeds out of range, zero/negative sizes, ``--out`` on a file or
under /proc, a non-UTF-8 workspace path, a truncated embedding store file (``emb-00000.npy`` /
``ids.npy`` / ``norms.npy``) or chunk file (``emb_*.npy``), ``--rebuild`` of a workspace another
process reads, a catalog of the first version, a layer the catalog lacks) and more.
Everything runs on a tiny workspace (the bundled demo CNN over seeded noise images) made in a
temporary folder. Prints a table, then one JSON line::

    {"cases": 55, "clean": 52, "tracebacks": 0, "silent": 0, "messy": 0, "ok": 3, "wrong": 0,
     "long_thin_peak_mb": 767, "search_m_1e9_peak_mb": 697, ...}

(Before issue 8's fixes: 18 tracebacks, 9 silent acceptances, 17 messy exits, 9 clean; the
long-thin build peaked at 6 GB.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import duckdb
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_index.catalog import Catalog, build_catalog  # noqa: E402
from data_index.workspace import Workspace  # noqa: E402
from explorer_core.demo_cnn import DEMO_LAYER  # noqa: E402
from explorer_core.models import load_model  # noqa: E402


@dataclass
class Case:
    name: str
    argv: list[str]  # after "python"
    expect: str = "error"  # "error" | "ok"
    check: Callable[[str], bool] | None = None  # for "ok": stdout is right
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    case: Case
    kind: str
    rc: int | None
    peak_mb: int
    seconds: float
    detail: str


# ---- inputs ----------------------------------------------------------------------------------

def noise_images(folder: Path, n: int, size: tuple[int, int] = (120, 100), seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i:03d}.png")


def long_thin_pngs(folder: Path) -> None:
    """A 1 000 000 x 16 px and a 16 x 1 000 000 px PNG (tens of KB each)."""
    folder.mkdir(parents=True, exist_ok=True)
    a = np.zeros((16, 1_000_000, 3), np.uint8)
    a[:, ::7] = 200
    a[:, :, 1] = (np.arange(1_000_000) % 256).astype(np.uint8)
    Image.fromarray(a).save(folder / "wide.png")
    Image.fromarray(np.ascontiguousarray(a.transpose(1, 0, 2))).save(folder / "tall.png")


def _ws(root: Path, lm, images: Path, mode: str = "crop") -> Workspace:
    return Workspace.create(root, model="demo", layer=DEMO_LAYER, images=str(images),
                            input_size=lm.input_size, mode=mode, device="cpu")


class _Stop(Exception):
    pass


def _stop_after_first_chunk(p) -> None:
    if p.stage == "index" and "chunks saved" in p.message:  # reported after each saved chunk
        raise _Stop()


def _copy(ws: Workspace, dest: Path) -> Path:
    shutil.copytree(ws.root, dest, ignore=shutil.ignore_patterns("cache", "*.wal"))
    return dest


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


_READER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])
    from data_index.catalog import Catalog
    cat = Catalog.open(sys.argv[1])
    print("open", flush=True)
    sys.stdin.read()
""")

_UNLISTABLE = textwrap.dedent("""
    # python -m data_index, with os.scandir failing on one folder as chmod 000 does (for root,
    # whom chmod does not stop)
    import os, runpy, sys
    locked = sys.argv.pop(1)
    real = os.scandir
    def scandir(path=".", *a, **k):
        if os.path.abspath(os.fsdecode(path)) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real(path, *a, **k)
    os.scandir = scandir
    sys.argv[0] = "data_index"
    runpy.run_module("data_index", run_name="__main__")
""")


def make_cases(tmp: Path) -> tuple[list[Case], Callable[[], None]]:
    """Build the inputs under ``tmp``; returns the cases and a cleanup for helper processes."""
    lm = load_model("demo", "cpu")
    imgs = tmp / "images"
    noise_images(imgs, 16)
    ws = _ws(tmp / "ws", lm, imgs)
    build_catalog(ws, model=lm, batch_size=8)
    with Catalog.open(ws) as cat:
        counts = cat.predicted_counts()
        ranked = sorted(counts, key=lambda c: (-counts[c], c))
        cls = str(ranked[0])
        other = str(ranked[1] if len(ranked) > 1 else (ranked[0] + 1) % lm.num_classes)
        n_crops = cat.n_crops
    W = str(ws.root)

    bad = {name: _copy(ws, tmp / f"bad_{name.replace('.', '_')}")
           for name in ("emb-00000.npy", "ids.npy", "norms.npy")}
    for name, root in bad.items():
        _truncate(Workspace.open(root).layer_dir(DEMO_LAYER) / name)
    v1 = _copy(ws, tmp / "v1")  # a catalog of the first version: meta schema 1, flat.faiss
    con = duckdb.connect(str(v1 / "catalog.duckdb"))
    con.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
    con.close()
    (v1 / "index" / "flat.faiss").write_bytes(b"old")
    # a resumable build (default chunk size 256) stopped after its first chunk (cell mode: one
    # forward per image, the cheapest way through 256 images)
    noise_images(tmp / "many", 260, size=(24, 24), seed=1)
    partial = _ws(tmp / "partial", lm, tmp / "many", mode="cell")
    try:
        build_catalog(partial, model=lm, progress=_stop_after_first_chunk)
    except _Stop:
        pass
    _truncate(partial.index_dir / "emb_00000.npy", 0.7)

    busy = _copy(ws, tmp / "busy")  # another process keeps its catalog open
    reader = subprocess.Popen([sys.executable, "-c", _READER, str(busy), str(ROOT)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert reader.stdout is not None and reader.stdout.readline().startswith("open")

    def cleanup() -> None:
        reader.communicate("", timeout=60)

    afile = tmp / "a_file.txt"
    afile.write_text("x")
    (tmp / "dir.csv").mkdir()
    nonutf8 = os.fsdecode(bytes(tmp) + b"/caf\xe9")
    os.makedirs(nonutf8, exist_ok=True)
    long_thin_pngs(tmp / "thin")
    unl = tmp / "unlistable"
    noise_images(unl, 2)
    noise_images(unl / "locked", 2, seed=2)
    o = str(tmp / "out")

    di = ["-m", "data_index"]
    ex = ["-m", "explainer"]
    explain = [*ex, "explain", "--workspace", W, "--class", cls, "--device", "cpu",
               "--max-images", "4"]
    contrast = [*ex, "contrast", "--workspace", W, "--a", cls, "--b", other, "--device", "cpu",
                "--max-images", "4"]
    pt = [*ex, "evaluate", "prediction-test", "--workspace", W, "--device", "cpu",
          "--max-images", "4"]
    sh = [*ex, "evaluate", "shift-test", "--workspace", W, "--device", "cpu", "--max-images", "4",
          "--min-images", "1"]
    search = [*di, "search", "--workspace", W]
    build = [*di, "build", "--workspace", str(_copy(ws, tmp / "rebuildable")), "--quiet"]
    cases = [
        # the tracebacks
        Case("explain --seed=-1", [*explain, "--seed=-1", "--out", o]),
        Case("explain --seed 2**32", [*explain, "--seed", str(2**32), "--out", o]),
        Case("contrast --seed 2**40", [*contrast, "--seed", str(2**40), "--out", o]),
        Case("shift-test --pairs 0", [*sh, "--pairs", "0", "--out", o]),
        Case("prediction-test --limit=-1", [*pt, "--limit=-1", "--out", o]),
        Case("explain --out <existing file>", [*explain, "--out", str(afile)]),
        Case("explain --out <under a file>", [*explain, "--out", str(afile / "sub")]),
        Case("explain --out /proc/x", [*explain, "--out", "/proc/x"]),
        Case("export --out /proc/x.csv", [*di, "export", "--workspace", W, "--table", "meta",
                                          "--out", "/proc/x.csv"]),
        Case("status --workspace <non-UTF-8 path>", [*di, "status", "--workspace", nonutf8]),
        Case("build --workspace <non-UTF-8 path>", [*di, "build", "--workspace", nonutf8,
                                                    "--model", "demo", "--images", str(imgs)]),
        Case("explain --workspace <non-UTF-8 path>", [*ex, "explain", "--workspace", nonutf8,
                                                      "--class", cls, "--out", o]),
        Case("build --images <non-UTF-8 path>", [*di, "build", "--workspace", str(tmp / "w8"),
                                                 "--model", "demo", "--images", nonutf8]),
        *[Case(f"search over truncated {name}",
               [*di, "search", "--workspace", str(root), "--crop-id", "0"])
          for name, root in bad.items()],
        *[Case(f"explain over truncated {name}",
               [*ex, "explain", "--workspace", str(root), "--class", cls, "--device", "cpu",
                "--out", o]) for name, root in bad.items()],
        Case("search over a v1 catalog", [*di, "search", "--workspace", str(v1), "--crop-id",
                                          "0"]),
        Case("explain over a v1 catalog", [*ex, "explain", "--workspace", str(v1), "--class",
                                           cls, "--device", "cpu", "--out", o]),
        Case("search --layer <not in the catalog>", [*search, "--crop-id", "0", "--layer",
                                                     "layer3.relu_out"]),
        Case("explain --layer <not in the catalog>", [*explain, "--layer", "nope", "--out", o]),
        Case("build --crop-size > image size", [*di, "build", "--workspace", str(tmp / "wg"),
                                                "--model", "demo", "--images", str(imgs),
                                                "--crop-size", "500"]),
        Case("build --shard without --shards", [*build, "--shard", "1"]),
        Case("build --merge without shards", [*build, "--merge"]),
        Case("build resume over truncated emb_00000.npy",
             [*di, "build", "--workspace", str(partial.root), "--quiet"]),
        Case("build --rebuild while another process reads it",
             [*di, "build", "--workspace", str(busy), "--rebuild", "--quiet"]),
        # the silent acceptances
        Case("evaluate --every 0", [*pt, "--every", "0", "--out", o]),
        Case("evaluate --every=-2", [*pt, "--every=-2", "--out", o]),
        Case("search -m 0", [*search, "--crop-id", "0", "-m", "0"]),
        Case("search -m=-5", [*search, "--crop-id", "0", "-m=-5"]),
        Case("build --batch-size 0", [*build, "--batch-size", "0", "--rebuild"]),
        Case("build --batch-size=-3", [*build, "--batch-size=-3", "--rebuild"]),
        Case("build --limit 0", [*build, "--limit", "0", "--rebuild"]),
        Case("build --limit=-1", [*build, "--limit=-1", "--rebuild"]),
        Case("prediction-test --limit 0", [*pt, "--limit", "0", "--out", o]),
        Case("prediction-test --min-images 0", [*pt, "--min-images", "0", "--out", o]),
        Case("prediction-test --classes ','", [*pt, "--classes", ",", "--out", o]),
        Case("shift-test --pairs=-4", [*sh, "--pairs=-4", "--out", o]),
        Case("shift-test --min-images=-1", [*sh, "--pairs", "1", "--min-images=-1", "--out", o]),
        Case("explain --n 0", [*explain, "--n", "0", "--out", o]),
        Case("explain --n 11", [*explain, "--n", "11", "--out", o]),
        Case("explain --max-images 0", [*explain, "--max-images", "0", "--out", o]),
        Case("explain --m 0", [*explain, "--m", "0", "--out", o]),
        Case("explain --m 1000000000", [*explain, "--m", "1000000000", "--out", o]),
        Case("prediction-test --n 0", [*pt, "--n", "0", "--out", o]),
        Case("prediction-test --seed=-7", [*pt, "--seed=-7", "--out", o]),
        Case("shift-test --seed 2**32", [*sh, "--seed", str(2**32), "--out", o]),
        Case("shift-test --max-images 0", [*sh, "--max-images", "0", "--out", o]),
        # more sizes and ids
        Case("search --crop-id=-1", [*search, "--crop-id=-1"]),
        Case("search --crop-id 10**30", [*search, "--crop-id", str(10**30)]),
        Case("search --crop-id <not in the catalog>", [*search, "--crop-id", str(10**6)]),
        Case("search --exclude-class=-1", [*search, "--crop-id", "0", "--exclude-class=-1"]),
        Case("search --exclude-class 2**40", [*search, "--crop-id", "0", "--exclude-class",
                                              str(2**40)]),
        Case("search -m abc", [*search, "--crop-id", "0", "-m", "abc"]),
        Case("export --out x.txt", [*di, "export", "--workspace", W, "--table", "meta", "--out",
                                    str(tmp / "x.txt")]),
        Case("export --out <existing folder>.csv", [*di, "export", "--workspace", W, "--table",
                                                    "meta", "--out", str(tmp / "dir.csv")]),
        Case("status --workspace 'bad name!'", [*di, "status", "--workspace", "bad name!"]),
        # valid but extreme: must succeed within bounds
        Case("search -m 1000000000 (capped)", [*search, "--crop-id", "0", "-m", "1000000000"],
             "ok", lambda out: len(out.splitlines()) == n_crops + 1),
        Case("build over 1e6 x 16 px images", [*di, "build", "--workspace", str(tmp / "thin_ws"),
                                               "--model", "demo", "--images", str(tmp / "thin"),
                                               "--device", "cpu", "--quiet"],
             "ok", lambda out: "2 images, 18 crops, 0 skipped" in out),
    ]
    unl_ws = [str(tmp / "unl_ws"), "--model", "demo", "--images", str(unl), "--device", "cpu",
              "--quiet"]
    if os.geteuid() == 0:  # root reads a chmod-000 folder: make os.walk fail the same way
        cases.append(Case("build over an unlistable sub-folder (simulated EACCES)",
                          ["-c", _UNLISTABLE, str(unl / "locked"), "build", "--workspace",
                           *unl_ws], "ok", lambda out: "2 images, 18 crops, 1 skipped" in out))
    else:
        (unl / "locked").chmod(0)
        cases.append(Case("build over an unlistable sub-folder (chmod 000)",
                          [*di, "build", "--workspace", *unl_ws], "ok",
                          lambda out: "2 images, 18 crops, 1 skipped" in out))
    return cases, cleanup


# ---- running ---------------------------------------------------------------------------------

# A process's ru_maxrss starts at the resident size of the process it was forked from (and
# survives exec), so a case launched straight from this torch-sized process would report at
# least our size. A small launcher forks the case from a fresh interpreter instead, caps its
# RLIMIT_DATA, and writes the case's own peak (KB) to a file.
_LAUNCHER = textwrap.dedent("""
    import os, resource, sys
    limit, peak_file = int(sys.argv[1]), sys.argv[2]
    pid = os.fork()
    if pid == 0:
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
        os.execv(sys.executable, [sys.executable, *sys.argv[3:]])
    _, status, usage = os.wait4(pid, 0)
    with open(peak_file, "w") as f:
        f.write(str(usage.ru_maxrss))
    code = os.waitstatus_to_exitcode(status)
    sys.exit(code if code >= 0 else 128 - code)
""")


def run_case(case: Case, timeout: float, mem_limit: int, tmp: Path) -> Outcome:
    out_f = tempfile.TemporaryFile(dir=tmp)
    err_f = tempfile.TemporaryFile(dir=tmp)
    fd, peak_file = tempfile.mkstemp(dir=tmp)
    os.close(fd)
    env = {**os.environ, "PYTHONPATH": str(ROOT), **case.env}
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(mem_limit), peak_file,
                             *case.argv], cwd=ROOT, stdout=out_f, stderr=err_f,
                            stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        rc: int | None = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the launcher and the case
        proc.wait()
        rc = None
    secs = time.perf_counter() - t
    out_f.seek(0)
    err_f.seek(0)
    out = out_f.read().decode("utf-8", "replace")
    err = err_f.read().decode("utf-8", "replace")
    text = Path(peak_file).read_text().strip()
    peak = int(text) // 1024 if text else -1
    lines = err.splitlines()
    first = next((ln for ln in reversed(lines) if ln.strip()), "") if "Traceback" in err \
        else (lines[0] if lines else out.splitlines()[0] if out.strip() else "")
    if rc is None:
        kind, first = "silent", f"accepted: still running after {timeout:.0f} s (killed)"
    elif "Traceback" in err or rc not in (0, 2):
        kind = "traceback"
    elif case.expect == "ok":
        kind = "ok" if rc == 0 and case.check is not None and case.check(out) else "wrong"
    elif rc == 0:
        kind = "silent"
    elif len(lines) == 1 and lines[0].startswith("error: "):
        kind = "clean"
    else:
        kind = "messy"
    return Outcome(case, kind, rc, peak, secs, first)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=3, help="cases run in parallel")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per case")
    ap.add_argument("--mem-limit-gb", type=float, default=4.0, help="RLIMIT_DATA per case")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="probe-inputs-") as d:
        tmp = Path(d)
        cases, cleanup = make_cases(tmp)
        t_setup = time.perf_counter() - t0
        try:
            with ThreadPoolExecutor(max(1, args.jobs)) as pool:
                outcomes = list(pool.map(lambda c: run_case(
                    c, args.timeout, int(args.mem_limit_gb * 2**30), tmp), cases))
        finally:
            cleanup()
    width = max(len(o.case.name) for o in outcomes)
    print(f"{'input':{width}}  {'outcome':9}  {'rc':>4}  {'peak MB':>7}  {'s':>5}  first line")
    for o in outcomes:
        rc = "-" if o.rc is None else str(o.rc)
        print(f"{o.case.name:{width}}  {o.kind:9}  {rc:>4}  {o.peak_mb:7d}  {o.seconds:5.1f}  "
              f"{o.detail[:110]}")
    kinds = [o.kind for o in outcomes]
    peak = {o.case.name: o.peak_mb for o in outcomes}
    summary = {"cases": len(outcomes), "clean": kinds.count("clean"),
               "tracebacks": kinds.count("traceback"), "silent": kinds.count("silent"),
               "messy": kinds.count("messy"), "ok": kinds.count("ok"),
               "wrong": kinds.count("wrong"),
               "long_thin_peak_mb": peak["build over 1e6 x 16 px images"],
               "search_m_1e9_peak_mb": peak["search -m 1000000000 (capped)"],
               "setup_s": round(t_setup, 1), "total_s": round(time.perf_counter() - t0, 1)}
    print(f"setup {t_setup:.1f} s, {len(outcomes)} cases on {args.jobs} workers")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
