"""The differential test: one corpus against the upstream kube-apiserver (started here, see
realkube.py) and against `ignis dev`'s API server (started by the caller, its kubeconfig given),
comparing what every step observed. Fails on any difference not listed in gaps.yaml (each with
its reason, mirrored in docs/dev-apiserver.md).

    python run.py --dev-kubeconfig PATH --workdir DIR [--only STEP ...]
"""

import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import corpus_more  # noqa: E402,F401  (registers the second half of the corpus)
from corpus import STEPS  # noqa: E402
from harness import Outcome, Target  # noqa: E402
from realkube import ROOT, RealKube  # noqa: E402


def install_crd(t):
    proc = t.kubectl("apply", "-f", str(ROOT / "crds/microvm.yaml"))
    if proc.returncode != 0:
        raise SystemExit(f"differential: cannot install the CRD on {t.name}: {proc.stderr}")
    # kubectl wait errors at once (".status.conditions accessor error") when it reads the CRD
    # before kube-apiserver wrote its first conditions (`conditions: null`): ask again.
    deadline = time.monotonic() + 60
    while True:
        proc = t.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                         "crd/microvms.ignis.dev", timeout=90)
        if proc.returncode == 0 or "accessor error" not in proc.stderr \
                or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if proc.returncode != 0:
        raise SystemExit(f"differential: the CRD is not established on {t.name}: {proc.stderr}")
    # Discovery of a new CRD reaches kubectl's cache a moment later on a real server.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if t.kubectl("get", "mvm", "-A").returncode == 0:
            return
        time.sleep(0.5)


def run_step(fn, t):
    try:
        return fn(t)
    except Exception as e:  # a broken step is a difference to see, not a crash
        return Outcome(crashed=f"{type(e).__name__}: {str(e)[:200]}",
                       where=traceback.format_exc().splitlines()[-4:-2])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dev-kubeconfig", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    gaps = yaml.safe_load((HERE / "gaps.yaml").read_text()) or {}
    work = Path(args.workdir)
    steps = [s for s in STEPS if not args.only or s.__name__ in args.only]

    with RealKube(work / "real") as real_kube:
        real = Target("kube-apiserver", real_kube.kubeconfig, work / "real-client")
        dev = Target("ignis-dev", args.dev_kubeconfig, work / "dev-client")
        for t in (real, dev):
            t.state = {}
            install_crd(t)
        differences, documented = [], []
        for fn in steps:
            want = run_step(fn, real)
            got = run_step(fn, dev)
            name = fn.__name__
            if want == got:
                print(f"same  {name}", flush=True)
                continue
            line = f"{name}\n    kube-apiserver: {want}\n    ignis-dev:      {got}"
            if name in gaps:
                documented.append(name)
                print(f"gap   {line}\n    documented: {gaps[name]}", flush=True)
            else:
                differences.append(line)
                print(f"DIFF  {line}", flush=True)
        for t in (real, dev):
            if "deep_seconds" in t.state:
                print(f"deepest body (100 000 levels) answered by {t.name} in "
                      f"{t.state['deep_seconds'] * 1000:.1f} ms", flush=True)
    stale = sorted(set(gaps) - {s.__name__ for s in steps} - set())
    print(f"differential: {len(steps)} steps, {len(steps) - len(differences) - len(documented)} "
          f"same, {len(documented)} documented gaps, {len(differences)} undocumented differences")
    if stale and not args.only:
        print(f"differential: gaps.yaml names steps that no longer exist: {stale}")
        return 1
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
