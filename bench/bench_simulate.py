"""Simulated participants of the intruder study on the demo world: accuracy per observer, its
shuffled control, ambiguous trials and seconds.

    python bench/bench_simulate.py [--trials 1000] [--classes 10] [--observers layer3,layer2,...]

Builds (or reuses, ``DEMO_WORKSPACE_HOME``) the demo workspace, explains the classes (n=4,
deeplift; cached on disk), makes a study of their top-8 crops in a temporary file and runs
:func:`study.simulate.simulate_study` with each observer separately and all together (for the
ambiguous count). Seconds include loading another model (EfficientNet-Lite2: most of it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--observers", default="layer3,layer2,layer4.relu_out,efficientnet_lite2")
    args = ap.parse_args()
    import os

    from demo_world.workspace import ensure_demo_workspace
    from explainer.concepts import explain_class, get_context
    from study import intruder as S
    from study import simulate as M

    home = os.environ.get("DEMO_WORKSPACE_HOME")
    ws = ensure_demo_workspace(home=Path(home) if home else Path(tempfile.mkdtemp()),
                               device="cpu")
    ctx = get_context(ws, "cpu")
    crops = {c: [[r.crop_id for r in con.crops] for con in
                 explain_class(ctx, c, device="cpu", cache=True).concepts]
             for c in range(args.classes)}
    study = S.create_study_from_crops(Path(tempfile.mkdtemp()) / S.STUDY_FILE, "demo", crops)
    observers = [M.parse_observer(t, ctx.lm) for t in args.observers.split(",")]
    print(f"{args.classes} classes x 4 concepts x 8 crops, {args.trials} trials, chance 0.20")
    print(f"{'observer':36} {'accuracy':>9} {'95% CI':>13} {'shuffled':>9} {'seconds':>8}")
    for obs in observers:
        sim = M.simulate_study(study, ctx.catalog, ctx.lm, [obs], n_trials=args.trials)
        r = sim.results[0]
        print(f"{r.observer.label:36} {r.overall.accuracy:9.3f} "
              f"{r.overall.ci_low:6.3f}-{r.overall.ci_high:5.3f} {r.shuffled.accuracy:9.3f} "
              f"{sim.seconds:8.2f}")
    sim = M.simulate_study(study, ctx.catalog, ctx.lm, observers, n_trials=args.trials)
    print(f"all observers together: {sim.n_ambiguous}/{len(sim.trials)} trials ambiguous "
          f"(margin < {sim.margin:g} for one of them, or they disagree)")


if __name__ == "__main__":
    main()
