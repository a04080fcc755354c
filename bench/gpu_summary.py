"""The one table of ``bench/gpu_check.sh``: reads the logs it left in OUT_DIR.

    python bench/gpu_summary.py OUT_DIR

Each step's log ends with one JSON line (the precompute step writes ``precompute.json``); a
step without it is shown with its exit status and last line. Also writes
``OUT_DIR/gpu_check.json`` (every step's figures) and projects the paper's ImageNet run (1000
classes, ResNet50 layer4.2) from the measured per-stage rates, with the assumptions named.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _last_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    for line in reversed(path.read_text(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def _status(out: Path, name: str) -> str:
    rc = out / f"{name}.rc"
    if not rc.is_file():
        return "not run"
    code, secs = (rc.read_text().split() + ["?", "?"])[:2]
    if code == "0":
        return f"ok ({secs} s)"
    why = "timed out" if code in ("124", "137") else f"exit {code}"
    log = out / f"{name}.log"
    last = log.read_text(errors="replace").strip().splitlines()[-1:] if log.is_file() else []
    return f"{why} ({secs} s){': ' + last[0][:100] if last else ''}"


def main(out_dir: str) -> int:
    out = Path(out_dir)
    env = (out / "env.log").read_text().strip() if (out / "env.log").is_file() else "?"
    rows: list[tuple[str, str, str, str]] = []
    figures: dict = {"env": env}

    g = _last_json(out / "gpu_bench.log")
    if g:
        s = g["seconds"]
        figures["gpu_bench"] = g
        rows.append((f"end to end, ours vs reference ({g['images']} images, "
                     f"{g['bank'] / 1e6:g} M bank)",
                     f"{s['ours_default']['end_to_end']:.1f} s vs "
                     f"{s['reference']['end_to_end']:.1f} s",
                     f"{g['ratio_default']:.0f}x (same NoiseTunnel method: "
                     f"{g['ratio_same_method']:.0f}x)", ">= 50x"))
        rows.append(("  attribution / NMF / search (ours, DeepLift)",
                     f"{s['ours_default']['attribution']:.2f} / {s['ours']['nmf']:.3f} / "
                     f"{s['ours']['search']:.3f} s", "", ""))
    else:
        rows.append(("gpu_bench", _status(out, "gpu_bench"), "", ">= 50x"))

    p = _last_json(out / "parity.log")
    if p:
        figures["parity"] = p
        rows.append(("CPU vs CUDA parity (demo world)",
                     f"min concept cos {p['min_concept_cos']:.4f}, same top-8 "
                     f"{p['same_top8_share']:.2f}, catalog max diff "
                     f"{p['catalog_max_abs_diff']:.1e}",
                     "PASS" if p["pass"] else "FAIL", "cos >= 0.99"))
    else:
        rows.append(("CPU vs CUDA parity", _status(out, "parity"), "", "cos >= 0.99"))

    pc = out / "precompute.json"
    if pc.is_file():
        d = json.loads(pc.read_text())
        figures["precompute"] = d
        secs = d.get("seconds") or {}
        rows.append(("precompute demo (10 classes, 45 pairs)",
                     ", ".join(f"{k} {float(v):.1f} s" for k, v in secs.items()), "", ""))
    else:
        rows.append(("precompute demo", _status(out, "precompute"), "", ""))

    pr = _last_json(out / "pairs.log")
    if pr:
        figures["pairs"] = pr
        r = next(iter(pr["results"].values()))
        rows.append((f"all {len(pr['results']) and list(pr['results'])[0]} pair classifiers "
                     "of one class (batched)",
                     f"{r['batched_s']:.3f} s ({r['pixels_b']} B pixels x {r['channels']})",
                     f"{r['separate_total_s'] / max(r['batched_s'], 1e-9):.0f}x vs separate",
                     "<= 1 s"))
    else:
        rows.append(("pair classifiers", _status(out, "pairs"), "", "<= 1 s"))

    sc = _last_json(out / "scale.log")
    if sc:
        figures["scale"] = sc
        for n, r in sc.items():
            if "cuda_p95_ms" in r:
                gb = int(n) * int(r.get("dim", 1280)) * 2 / 1e9
                est = r["cuda_p95_ms"] * 11.5e6 / int(n)
                rows.append((f"GPU exact top-8, {int(n) / 1e6:.1f} M x {r.get('dim')} fp16 "
                             f"({gb:.1f} GB)",
                             f"p50/p95 {r['cuda_p50_ms']} / {r['cuda_p95_ms']} ms (4 q), "
                             f"same ids as CPU {r['cuda_same_ids_as_cpu']:.3f}",
                             f"11.5 M: ~{est:.0f} ms (linear in N)", "<= 30 ms"))
    else:
        rows.append(("GPU exact search", _status(out, "scale"), "", "<= 30 ms"))

    if g and pr:
        s = g["seconds"]["ours_default"]
        per_img = s["attribution"] / g["images"]
        r = next(iter(pr["results"].values()))
        concepts_h = 1000 * (500 * per_img + g["seconds"]["ours"]["nmf"]
                             + g["seconds"]["ours"]["search"] * 11.5) / 3600
        pairs_h = 1000 * r["batched_s"] / 3600
        figures["projection_h"] = {"concepts": concepts_h, "pairs": pairs_h}
        rows.append(("projection: 1000 ImageNet classes",
                     f"concepts {concepts_h:.2f} h, pairs {pairs_h:.2f} h",
                     "paper: 29 h + 35 h",
                     "500 images/class; search over 11.5 M = 11.5x the 1 M bank; pairs at "
                     "the measured pixels per class"))

    print(f"\n# GPU check: {env}")
    print("| check | measured | result | target / note |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    (out / "gpu_check.json").write_text(json.dumps(figures, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "gpu-check-out"))
