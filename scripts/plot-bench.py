#!/usr/bin/env python3
"""Plot `ignis bench` results (results/*.json) as PNGs for docs/benchmarks.md.

Usage: scripts/plot-bench.py [RESULTS_DIR] [OUT_DIR]   (defaults: results docs/img)

matplotlib is installed on first use into a private virtualenv, results/.venv-plot (results/
is gitignored), so nothing touches the system Python.
"""

import json
import os
import subprocess
import sys
import venv

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def ensure_matplotlib():
    """Re-run this script inside a venv that has matplotlib, creating it if needed."""
    try:
        import matplotlib  # noqa: F401

        return
    except ImportError:
        pass
    env = os.path.join(ROOT, "results", ".venv-plot")
    py = os.path.join(env, "bin", "python")
    if not os.path.exists(py):
        print(f"creating {env} with matplotlib", file=sys.stderr)
        venv.create(env, with_pip=True)
        subprocess.run([py, "-m", "pip", "install", "--quiet", "matplotlib"], check=True, timeout=600)
    if os.environ.get("IGNIS_PLOT_REEXEC"):
        sys.exit("matplotlib is still missing after installing it")
    os.environ["IGNIS_PLOT_REEXEC"] = "1"
    os.execv(py, [py] + sys.argv)


def load(results, bench):
    path = os.path.join(results, f"{bench}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def cdf(ax, samples, label, style):
    xs = sorted(samples)
    ys = [(i + 1) / len(xs) for i in range(len(xs))]
    ax.step(xs, ys, where="post", label=label, linestyle=style)


def plot_boot(data, machine, out):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, mode in zip(axes, ["sequential", "concurrent"]):
        d = data[mode]
        cdf(ax, d["ignis_ready_ms"], "Ignis: apply → Ready", "-")
        cdf(ax, d["bare_ms"], "bare QEMU: spawn → marker", "--")
        cdf(ax, d["ignis_scheduled_ms"], "Ignis: apply → Scheduled", ":")
        ax.set_title(f"{mode} (N={data['count']})")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of boots")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"boot latency, {machine['cores']} cores, {machine['accelerator']}, {machine['qemu'].split('(')[0].strip()}")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "bench-boot-cdf.png"), dpi=110)
    plt.close(fig)


def plot_control_plane(data, machine, out):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run in data:
        tl = run["timeline"]
        ax.plot([t for t, _ in tl], [n for _, n in tl], label=f"{run['count']} MicroVMs")
    ax.set_xlabel("seconds since the first create")
    ax.set_ylabel("MicroVMs Scheduled")
    ax.set_title(f"control plane, simulated VMM, {machine['cores']} cores")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "bench-control-plane.png"), dpi=110)
    plt.close(fig)


def plot_soak(data, machine, out):
    """The soak's samples over time: every figure the verdict checks, with the phases shaded."""
    import matplotlib.pyplot as plt

    samples = data["samples"]
    t = [s["t_s"] for s in samples]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    kinds = sorted({k for s in samples for k in s["fds"]})
    for k in kinds:
        axes[0][0].plot(t, [s["fds"].get(k, 0) for s in samples], label=k)
    axes[0][0].set_ylabel("agent fds")
    axes[0][1].plot(t, [s["rss_bytes"] / 2**20 for s in samples], label="RSS (MiB)")
    axes[0][1].plot(t, [s["threads"] for s in samples], label="threads")
    axes[0][1].set_ylabel("agent")
    for key, label in [("processes", "processes held"), ("state_dirs", "VM state dirs"),
                       ("taps", "Ignis taps"), ("watchers", "agent_vmm_watchers")]:
        axes[1][0].plot(t, [s.get(key) or 0 for s in samples], label=label)
    axes[1][0].set_ylabel("count")
    axes[1][1].plot(t, [s["microvms"] for s in samples], label="MicroVMs")
    axes[1][1].plot(t, [s["events"] for s in samples], label="Events")
    axes[1][1].set_ylabel("API objects")
    for ax in sum(axes, []):
        start = None
        for s in samples:
            if s["phase"] != "load" and start is not None:
                ax.axvspan(start, s["t_s"], color="orange", alpha=0.08)
                start = None
            elif s["phase"] == "load" and start is None:
                start = s["t_s"]
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    for ax in axes[1]:
        ax.set_xlabel("seconds (shaded: workload running)")
    fig.suptitle(f"soak: {data['cycles']} cycles, {data['restarts']} agent restarts, "
                 f"{machine['cores']} cores, {machine['accelerator']}")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "bench-soak.png"), dpi=110)
    plt.close(fig)


def main():
    ensure_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    results = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "results")
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, "docs", "img")
    os.makedirs(out, exist_ok=True)
    made = []
    boot = load(results, "boot")
    if boot:
        plot_boot(boot["data"], boot["machine"], out)
        made.append("bench-boot-cdf.png")
    cp = load(results, "control-plane")
    if cp:
        plot_control_plane(cp["data"], cp["machine"], out)
        made.append("bench-control-plane.png")
    soak = load(results, "soak")
    if soak:
        plot_soak(soak["data"], soak["machine"], out)
        made.append("bench-soak.png")
    if not made:
        sys.exit(f"no results in {results}; run `ignis bench all` first")
    for m in made:
        print(os.path.join(out, m))


if __name__ == "__main__":
    main()
