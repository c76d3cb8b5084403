"""The upstream Kubernetes API server for the differential test: etcd and kube-apiserver (and
kube-controller-manager with only its namespace controller, so a deleted namespace empties and
goes as on a cluster), built from their official Go modules by scripts/tools.sh, on loopback
ephemeral ports, in a temporary directory, with RBAC on and a static admin token. Every wait is
bounded and every process is stopped (its whole process group) on exit.
"""

import os
import signal
import socket
import subprocess
import time
import urllib.request
import ssl
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def tool_dir(tool):
    out = subprocess.run(
        [str(ROOT / "scripts/tools.sh"), "bindir", tool],
        check=True, capture_output=True, text=True, timeout=30,
    )
    return Path(out.stdout.strip())


def ensure_tools():
    """The kube and etcd binaries, built by scripts/tools.sh when not cached yet."""
    dirs = {t: tool_dir(t) for t in ("kube", "etcd")}
    if not all((d / ".complete").exists() for d in dirs.values()):
        print("differential: building kube-apiserver and etcd with scripts/tools.sh (cold: ~15 min)",
              flush=True)
        subprocess.run([str(ROOT / "scripts/tools.sh"), "build", "kube", "etcd"], check=True,
                       timeout=3600)
    for tool, d in dirs.items():
        if not (d / ".complete").exists():
            raise SystemExit(f"differential: scripts/tools.sh did not produce {tool} in {d}")
    return dirs["kube"], dirs["etcd"]


def _terminate(signum, frame):
    raise SystemExit(f"differential: stopped by signal {signum}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RealKube:
    """A running etcd + kube-apiserver (+ namespace controller); use as a context manager."""

    def __init__(self, workdir):
        self.dir = Path(workdir)
        self.procs = []
        self.token = "differential-admin-token"

    def _spawn(self, name, argv):
        log = open(self.dir / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def __enter__(self):
        # A SIGTERM (the Rust test's deadline) unwinds through __exit__, which stops the
        # servers; so does a failure half-way through starting them.
        signal.signal(signal.SIGTERM, _terminate)
        try:
            return self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def _start(self):
        kube, etcd = ensure_tools()
        self.dir.mkdir(parents=True, exist_ok=True)
        client, peer, secure = free_port(), free_port(), free_port()
        self._spawn("etcd", [
            str(etcd / "etcd"), "--name", "diff", "--data-dir", str(self.dir / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{client}",
            "--advertise-client-urls", f"http://127.0.0.1:{client}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"diff=http://127.0.0.1:{peer}",
            "--log-level", "warn",
        ])
        sa_key = self.dir / "sa.key"
        subprocess.run(["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True,
                       capture_output=True, timeout=60)
        (self.dir / "tokens.csv").write_text(f"{self.token},admin,admin-uid,system:masters\n")
        certs = self.dir / "certs"
        self._spawn("kube-apiserver", [
            str(kube / "kube-apiserver"),
            "--etcd-servers", f"http://127.0.0.1:{client}",
            "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
            "--secure-port", str(secure), "--cert-dir", str(certs),
            "--token-auth-file", str(self.dir / "tokens.csv"),
            "--authorization-mode", "RBAC",
            "--service-account-issuer", "https://kubernetes.default.svc",
            "--service-account-key-file", str(sa_key),
            "--service-account-signing-key-file", str(sa_key),
            "--service-cluster-ip-range", "10.96.0.0/16",
            "--enable-priority-and-fairness=false", "--profiling=false",
            "--endpoint-reconciler-type", "none",
        ])
        self.url = f"https://127.0.0.1:{secure}"
        self.ca = certs / "apiserver.crt"
        self._wait_ready(time.monotonic() + 180)
        self.kubeconfig = self.dir / "kubeconfig"
        self.kubeconfig.write_text(f"""apiVersion: v1
kind: Config
clusters:
- name: real
  cluster: {{server: "{self.url}", certificate-authority: "{self.ca}"}}
contexts:
- name: real
  context: {{cluster: real, user: admin, namespace: default}}
current-context: real
users:
- name: admin
  user: {{token: {self.token}}}
""")
        self._spawn("kube-controller-manager", [
            str(kube / "kube-controller-manager"),
            "--kubeconfig", str(self.kubeconfig), "--controllers", "namespace",
            "--leader-elect=false", "--bind-address", "127.0.0.1",
            "--secure-port", str(free_port()),
        ])
        return self

    def _wait_ready(self, deadline):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        last = None
        while time.monotonic() < deadline:
            for name, proc in self.procs:
                if proc.poll() is not None:
                    tail = (self.dir / f"{name}.log").read_text(errors="replace")[-3000:]
                    raise SystemExit(f"differential: {name} exited with {proc.returncode}:\n{tail}")
            try:
                req = urllib.request.Request(self.url + "/readyz",
                                             headers={"Authorization": f"Bearer {self.token}"})
                with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:
                    if resp.status == 200:
                        return
            except Exception as e:  # not up yet
                last = e
            time.sleep(0.5)
        raise SystemExit(f"differential: kube-apiserver not ready in time ({last})")

    def __exit__(self, *exc):
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=5)
        return False


if __name__ == "__main__":
    # Manual use: serve until Ctrl-C and print the kubeconfig path.
    import sys
    import tempfile
    with tempfile.TemporaryDirectory(prefix="realkube-") as d, RealKube(d) as k:
        print(f"KUBECONFIG={k.kubeconfig}", flush=True)
        try:
            time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 3600)
        except KeyboardInterrupt:
            pass
