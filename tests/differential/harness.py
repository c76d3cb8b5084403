"""Targets and outcomes of the differential test: one API server reached through raw HTTP,
kubectl, the official Python client, lightkube and kr8s, and each answer reduced to what the
test compares (status code, Status reason, the fields the answer names)."""

import base64
import json
import re
import subprocess
import tempfile
from pathlib import Path

import requests
import urllib3
import yaml

urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)

# Fields a message names, where the answer has no causes: strict decoding and field selectors.
FIELD_PATTERNS = [
    re.compile(r'(?:unknown|duplicate) field "([^"]+)"'),
    re.compile(r"field label not supported: (\S+)"),
    re.compile(r'"([^"]+)" is not a known field selector'),
]


def fields_named(status):
    """The sorted set of fields a Status names: its causes, else its message's patterns."""
    causes = (status.get("details") or {}).get("causes") or []
    found = {c.get("field", "") for c in causes if c.get("field")}
    if not found:
        message = status.get("message", "")
        for pattern in FIELD_PATTERNS:
            found.update(pattern.findall(message))
    return sorted(found)


class Outcome:
    """What one step observed, in comparable form."""

    def __init__(self, **parts):
        self.parts = parts

    def __eq__(self, other):
        return self.parts == other.parts

    def __repr__(self):
        return json.dumps(self.parts, sort_keys=True, default=str)


def http_outcome(resp, project=None):
    """Code, Status reason and named fields of an answer; `project` picks more of a success."""
    parts = {"code": resp.status_code}
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("kind") == "Status":
        parts["reason"] = body.get("reason", "")
        parts["fields"] = fields_named(body)
    elif project and body is not None:
        parts["value"] = project(body)
    return Outcome(**parts)


class Target:
    """One API server under test."""

    def __init__(self, name, kubeconfig, workdir):
        self.name = name
        self.kubeconfig = Path(kubeconfig)
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        config = yaml.safe_load(self.kubeconfig.read_text())
        cluster = config["clusters"][0]["cluster"]
        self.url = cluster["server"]
        self.token = config["users"][0]["user"]["token"]
        if "certificate-authority-data" in cluster:
            ca = self.dir / "ca.crt"
            ca.write_bytes(base64.b64decode(cluster["certificate-authority-data"]))
            self.ca = str(ca)
        else:
            self.ca = cluster["certificate-authority"]
        self.session = requests.Session()
        # Loopback test traffic to servers this test started: kubectl and the Python clients
        # verify the CA; the raw requests do not need to.
        self.session.verify = False
        self.session.trust_env = False
        self.session.headers["Authorization"] = f"Bearer {self.token}"
        self._k8s = self._lightkube = self._kr8s = None

    # Raw HTTP ---------------------------------------------------------------------------------
    def http(self, method, path, body=None, content_type="application/json", headers=None,
             stream=False, timeout=30):
        h = dict(headers or {})
        data = body
        if isinstance(body, (dict, list)):
            data = json.dumps(body)
        if data is not None and content_type is not None:
            h.setdefault("Content-Type", content_type)
        return self.session.request(method, self.url + path, data=data, headers=h,
                                    stream=stream, timeout=timeout)

    # kubectl ----------------------------------------------------------------------------------
    def kubectl(self, *args, stdin=None, timeout=60):
        proc = subprocess.run(
            ["kubectl", "--kubeconfig", str(self.kubeconfig), "--request-timeout=20s", *args],
            input=stdin, capture_output=True, text=True, timeout=timeout,
            env={"HOME": str(self.dir), "PATH": "/usr/local/bin:/usr/bin:/bin"},
        )
        return proc

    # Python clients ---------------------------------------------------------------------------
    @property
    def k8s(self):
        """The official client's ApiClient."""
        if self._k8s is None:
            import kubernetes
            self._k8s = kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))
        return self._k8s

    @property
    def lightkube(self):
        if self._lightkube is None:
            import lightkube
            from lightkube.config.kubeconfig import KubeConfig
            self._lightkube = lightkube.Client(config=KubeConfig.from_file(str(self.kubeconfig)),
                                               field_manager="lightkube")
        return self._lightkube

    @property
    def kr8s(self):
        if self._kr8s is None:
            import kr8s
            self._kr8s = kr8s.api(kubeconfig=str(self.kubeconfig))
        return self._kr8s


def kubectl_outcome(proc, project=None):
    """Exit status and the reason kubectl prints for a server error."""
    parts = {"ok": proc.returncode == 0}
    m = re.search(r"Error from server \((\w+)\)", proc.stderr)
    if m:
        parts["reason"] = m.group(1)
    if project and proc.returncode == 0:
        parts["value"] = project(proc.stdout)
    return Outcome(**parts)


def client_outcome(fn, project=None):
    """Run a Python-client call: ok (with a projection of the result) or the API error's
    code and reason, whichever client raised it."""
    try:
        result = fn()
    except Exception as e:  # every client has its own exception type
        code = getattr(e, "status", None)
        reason = getattr(e, "reason", None)
        body = getattr(e, "body", None)
        status = getattr(e, "status", None)
        # lightkube: ApiError.status is a Status model
        if hasattr(status, "code"):
            return Outcome(code=status.code, reason=status.reason)
        # kr8s: ServerError carries the httpx response
        resp = getattr(e, "response", None)
        if resp is not None and hasattr(resp, "status_code"):
            try:
                reason = resp.json().get("reason")
            except ValueError:
                reason = None
            return Outcome(code=resp.status_code, reason=reason)
        if isinstance(code, int):
            try:
                reason = json.loads(body).get("reason")
            except (TypeError, ValueError):
                pass
            return Outcome(code=code, reason=reason)
        return Outcome(error=type(e).__name__)
    return Outcome(ok=True, value=project(result) if project else None)


def temp_file(text):
    f = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    f.write(text)
    f.close()
    return f.name
