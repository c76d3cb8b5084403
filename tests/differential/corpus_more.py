"""The corpus, second part: deletes, server-side apply with several managers, watches, the
Python clients, namespaces and Helm. Registered after corpus.py's steps, in this order."""

import json
import threading
import time

from corpus import CM, MVM, NS, cm, delete_options_pb, owners, step, vm
from harness import Outcome, client_outcome, http_outcome, kubectl_outcome, temp_file


# --- deletes ----------------------------------------------------------------------------------

@step
def http_delete_protobuf_body(t):
    t.http("POST", CM, cm("pb1"))
    r = t.http("DELETE", CM + "/pb1", delete_options_pb(),
               content_type="application/vnd.kubernetes.protobuf")
    return Outcome(delete=http_outcome(r).parts,
                   after=http_outcome(t.http("GET", CM + "/pb1")).parts)


@step
def http_delete_protobuf_precondition(t):
    t.http("POST", CM, cm("pb2"))
    r = t.http("DELETE", CM + "/pb2", delete_options_pb(uid="not-the-uid"),
               content_type="application/vnd.kubernetes.protobuf")
    return http_outcome(r)


@step
def http_delete_json_dry_run(t):
    r = t.http("DELETE", CM + "/pb2", {"kind": "DeleteOptions", "apiVersion": "v1",
                                         "dryRun": ["All"]})
    return Outcome(delete=r.status_code, still=t.http("GET", CM + "/pb2").status_code)


@step
def http_delete_precondition_resource_version(t):
    r = t.http("DELETE", CM + "/pb2", {"preconditions": {"resourceVersion": "1"}})
    return http_outcome(r)


@step
def http_delete_with_finalizer(t):
    t.http("POST", MVM, vm("fin2", metadata={"finalizers": ["ignis.dev/test"]}))
    d = t.http("DELETE", MVM + "/fin2").json()
    still = t.http("GET", MVM + "/fin2").json()
    t.http("PATCH", MVM + "/fin2", {"metadata": {"finalizers": None}},
           content_type="application/merge-patch+json")
    gone = t.http("GET", MVM + "/fin2").status_code
    return Outcome(marked="deletionTimestamp" in d["metadata"],
                   still="deletionTimestamp" in still["metadata"], gone=gone)


# --- server-side apply with several managers -------------------------------------------------------

def apply(t, manager, data, force=False, name="ssa1"):
    q = f"?fieldManager={manager}" + ("&force=true" if force else "")
    return t.http("PATCH", f"{CM}/{name}{q}", json.dumps(cm(name, data)),
                  content_type="application/apply-patch+yaml")


@step
def ssa_first_manager(t):
    return http_outcome(apply(t, "one", {"a": "1", "b": "2"}), project=owners)


@step
def ssa_conflict(t):
    return http_outcome(apply(t, "two", {"a": "9", "b": "2"}))


@step
def ssa_force_takes_ownership(t):
    return http_outcome(apply(t, "two", {"a": "9", "b": "2"}, force=True), project=owners)


@step
def ssa_same_value_is_shared(t):
    return http_outcome(apply(t, "three", {"a": "9", "b": "2"}), project=owners)


@step
def ssa_conflict_names_every_owner(t):
    r = apply(t, "four", {"a": "0"})
    body = r.json()
    return Outcome(code=r.status_code, reason=body.get("reason"),
                   managers=sorted(c["message"] for c in body["details"]["causes"]))


@step
def ssa_update_steals(t):
    r = t.http("PATCH", f"{CM}/ssa1?fieldManager=patcher", {"data": {"a": "5", "c": "3"}},
               content_type="application/merge-patch+json")
    return http_outcome(r, project=owners)


@step
def ssa_no_op_apply(t):
    before = t.http("GET", f"{CM}/ssa1").json()["metadata"]["resourceVersion"]
    after = apply(t, "three", {"b": "2"}).json()
    return Outcome(owners=owners(after),
                   changed=after["metadata"]["resourceVersion"] != before)


@step
def ssa_drop_field(t):
    return http_outcome(apply(t, "one", {}), project=lambda b: (b["data"], owners(b)))


@step
def ssa_status_of_microvm(t):
    body = {"apiVersion": "ignis.dev/v1alpha1", "kind": "MicroVM",
            "status": {"phase": "Running", "conditions": [
                {"type": "Ready", "status": "True", "reason": "GuestReady", "message": "",
                 "lastTransitionTime": "2026-11-22T10:00:00Z"}]}}
    r = t.http("PATCH", f"{MVM}/vm2/status?fieldManager=ctl&force=true", json.dumps(body),
               content_type="application/apply-patch+yaml")
    return http_outcome(r, project=lambda b: (b["status"]["phase"], owners(b)))


@step
def ssa_create_via_apply(t):
    return http_outcome(apply(t, "creator", {"x": "1"}, name="ssa2"), project=owners)


@step
def ssa_kubectl_force_conflicts(t):
    path = temp_file(json.dumps(cm("ssa3", {"a": "1"})))
    t.kubectl("-n", NS, "apply", "--server-side", "--field-manager=one", "-f", path)
    path2 = temp_file(json.dumps(cm("ssa3", {"a": "2"})))
    a = kubectl_outcome(t.kubectl("-n", NS, "apply", "--server-side", "--field-manager=other",
                                  "-f", path2))
    b = kubectl_outcome(t.kubectl("-n", NS, "apply", "--server-side", "--field-manager=other",
                                  "--force-conflicts", "-f", path2))
    obj = t.http("GET", f"{CM}/ssa3").json()
    return Outcome(conflict=a.parts, forced=b.parts, owners=owners(obj))


# --- watches ------------------------------------------------------------------------------------

def watch_types(t, path, rv, seconds=2, extra=""):
    r = t.http("GET", f"{path}?watch=true&resourceVersion={rv}&timeoutSeconds={seconds}{extra}",
               stream=True, timeout=seconds + 10)
    types = []
    for line in r.iter_lines():
        if line:
            ev = json.loads(line)
            if ev["type"] != "BOOKMARK":
                types.append((ev["type"], ev["object"]["metadata"].get("name")))
    return types


@step
def watch_resume_from_version(t):
    rv = t.http("POST", CM, cm("w1")).json()["metadata"]["resourceVersion"]
    t.http("PATCH", CM + "/w1", {"data": {"a": "2"}}, content_type="application/merge-patch+json")
    t.http("PATCH", CM + "/w1", {"data": {"a": "3"}}, content_type="application/merge-patch+json")
    t.http("DELETE", CM + "/w1")
    return Outcome(events=watch_types(t, CM, rv))


@step
def watch_selector_sees_leave_and_enter(t):
    rv = t.http("POST", CM, cm("w2", labels={"sel": "yes"})).json()["metadata"]["resourceVersion"]
    t.http("PATCH", CM + "/w2", {"metadata": {"labels": {"sel": "no"}}},
           content_type="application/merge-patch+json")
    t.http("PATCH", CM + "/w2", {"metadata": {"labels": {"sel": "yes"}}},
           content_type="application/merge-patch+json")
    return Outcome(events=watch_types(t, CM, rv, extra="&labelSelector=sel%3Dyes"))


@step
def watch_live_events(t):
    result = {}

    def run():
        result["types"] = watch_types(t, MVM, t.http("GET", MVM).json()["metadata"]["resourceVersion"],
                                      seconds=3)

    th = threading.Thread(target=run)
    th.start()
    time.sleep(1)
    t.http("POST", MVM, vm("wl1"))
    t.http("DELETE", MVM + "/wl1")
    th.join(timeout=20)
    return Outcome(events=result.get("types"))


@step
def watch_bad_resource_version(t):
    r = t.http("GET", CM + "?watch=true&resourceVersion=abc&timeoutSeconds=1")
    return http_outcome(r)


# --- Python clients ---------------------------------------------------------------------------------

@step
def python_client_crud(t):
    import kubernetes
    core = kubernetes.client.CoreV1Api(t.k8s)
    body = kubernetes.client.V1ConfigMap(metadata=kubernetes.client.V1ObjectMeta(name="py1"),
                                         data={"a": "1"})
    out = {
        "create": client_outcome(lambda: core.create_namespaced_config_map(NS, body),
                                 lambda o: o.metadata.managed_fields[0].manager).parts,
        "dup": client_outcome(lambda: core.create_namespaced_config_map(NS, body)).parts,
        "list": client_outcome(lambda: core.list_namespaced_config_map(NS, limit=2),
                               lambda o: (len(o.items), bool(o.metadata._continue))).parts,
        "delete": client_outcome(lambda: core.delete_namespaced_config_map(
            "py1", NS, body=kubernetes.client.V1DeleteOptions(propagation_policy="Foreground")),
            lambda o: o.kind).parts,
        "missing": client_outcome(lambda: core.read_namespaced_config_map("py1", NS)).parts,
    }
    return Outcome(**out)


@step
def python_client_custom_objects(t):
    import kubernetes
    co = kubernetes.client.CustomObjectsApi(t.k8s)
    args = ("ignis.dev", "v1alpha1", NS, "microvms")
    return Outcome(
        create=client_outcome(lambda: co.create_namespaced_custom_object(*args, vm("py-vm")),
                              lambda o: o["spec"]["runPolicy"]).parts,
        invalid=client_outcome(lambda: co.create_namespaced_custom_object(*args, vm("py-bad", 99))).parts,
        patch=client_outcome(lambda: co.patch_namespaced_custom_object(
            *args, "py-vm", {"metadata": {"labels": {"x": "y"}}}),
            lambda o: o["metadata"]["labels"]).parts,
        delete=client_outcome(lambda: co.delete_namespaced_custom_object(*args, "py-vm"),
                              lambda o: o.get("kind")).parts,
    )


@step
def lightkube_crud_and_apply(t):
    from lightkube.resources.core_v1 import ConfigMap
    from lightkube.models.meta_v1 import ObjectMeta
    c = t.lightkube
    obj = ConfigMap(metadata=ObjectMeta(name="lk1", namespace=NS), data={"a": "1"})
    return Outcome(
        create=client_outcome(lambda: c.create(obj), lambda o: o.data).parts,
        apply=client_outcome(lambda: c.apply(ConfigMap(metadata=ObjectMeta(name="lk1",
                             namespace=NS), data={"a": "2"}), force=True),
                             lambda o: o.data).parts,
        get=client_outcome(lambda: c.get(ConfigMap, "lk1", namespace=NS),
                           lambda o: o.data).parts,
        listed=client_outcome(lambda: len(list(c.list(ConfigMap, namespace=NS, chunk_size=2))) > 2).parts,
        delete=client_outcome(lambda: c.delete(ConfigMap, "lk1", namespace=NS)).parts,
        missing=client_outcome(lambda: c.get(ConfigMap, "lk1", namespace=NS)).parts,
    )


@step
def kr8s_crud(t):
    import kr8s.objects
    api = t.kr8s
    cmobj = kr8s.objects.ConfigMap({"metadata": {"name": "kr1", "namespace": NS},
                                    "data": {"a": "1"}}, api=api)

    def create():
        cmobj.create()
        return True

    def patch():
        cmobj.patch({"data": {"a": "2"}})
        return cmobj.raw["data"]

    def delete():
        cmobj.delete()
        return True

    return Outcome(
        create=client_outcome(create).parts,
        patch=client_outcome(patch).parts,
        listed=client_outcome(lambda: len(list(api.get("configmaps", namespace=NS))) > 2).parts,
        delete=client_outcome(delete).parts,
    )


# --- namespaces -----------------------------------------------------------------------------------

@step
def namespace_terminating(t):
    t.http("POST", "/api/v1/namespaces", {"metadata": {"name": "doomed"}})
    t.http("POST", "/api/v1/namespaces/doomed/configmaps", cm("c"))
    t.http("POST", "/apis/ignis.dev/v1alpha1/namespaces/doomed/microvms",
           vm("held", metadata={"finalizers": ["ignis.dev/test"]}))
    d = t.http("DELETE", "/api/v1/namespaces/doomed").json()
    create = http_outcome(t.http("POST", "/api/v1/namespaces/doomed/configmaps", cm("late")))
    # Let the namespace controller (real server) get to it; ours empties it at once.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        held = t.http("GET", "/apis/ignis.dev/v1alpha1/namespaces/doomed/microvms/held").json()
        if held.get("metadata", {}).get("deletionTimestamp"):
            break
        time.sleep(0.5)
    phase = t.http("GET", "/api/v1/namespaces/doomed").json().get("status", {}).get("phase")
    t.http("PATCH", "/apis/ignis.dev/v1alpha1/namespaces/doomed/microvms/held",
           {"metadata": {"finalizers": None}}, content_type="application/merge-patch+json")
    gone = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        gone = t.http("GET", "/api/v1/namespaces/doomed").status_code
        if gone == 404:
            break
        time.sleep(0.5)
    return Outcome(phase_on_delete=d.get("status", {}).get("phase"), create=create.parts,
                   phase_while_held=phase, finally_gone=gone)


@step
def namespace_protected(t):
    return http_outcome(t.http("DELETE", "/api/v1/namespaces/default"))


# --- Helm v4 (the CLI built by scripts/tools.sh) ---------------------------------------------------

def helm_bin():
    import subprocess
    from realkube import ROOT
    subprocess.run([str(ROOT / "scripts/tools.sh"), "build", "helm"], check=True, timeout=1800,
                   capture_output=True)
    out = subprocess.run([str(ROOT / "scripts/tools.sh"), "bindir", "helm"], check=True,
                         capture_output=True, text=True, timeout=30)
    return out.stdout.strip() + "/helm"


def write_chart(base):
    import os
    chart = os.path.join(base, "chart")
    os.makedirs(os.path.join(chart, "templates"), exist_ok=True)
    files = {
        "Chart.yaml": "apiVersion: v2\nname: diff\nversion: 0.1.0\n",
        "values.yaml": "runPolicy: Always\n",
        "templates/cm.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata:\n"
                             "  name: {{ .Release.Name }}-cm\ndata:\n  p: {{ .Values.runPolicy }}\n",
        "templates/vm.yaml": "apiVersion: ignis.dev/v1alpha1\nkind: MicroVM\nmetadata:\n"
                             "  name: {{ .Release.Name }}-vm\nspec:\n"
                             "  runPolicy: {{ .Values.runPolicy }}\n"
                             "  resources: {vcpus: 1, memory: 256Mi}\n"
                             "  kernel: {path: /boot/vmlinuz}\n",
    }
    for name, text in files.items():
        with open(os.path.join(chart, name), "w") as f:
            f.write(text)
    return chart


@step
def helm_install_upgrade_uninstall_install(t):
    import subprocess
    helm = helm_bin()
    chart = write_chart(str(t.dir))
    home = str(t.dir / "helm-home")
    env = {"HOME": home, "HELM_CACHE_HOME": home + "/cache", "HELM_CONFIG_HOME": home + "/config",
           "HELM_DATA_HOME": home + "/data", "PATH": "/usr/bin:/bin"}

    def helm_run(*args):
        p = subprocess.run([helm, *args, "--kubeconfig", str(t.kubeconfig), "-n", NS],
                           capture_output=True, text=True, timeout=120, env=env)
        return p.returncode == 0 or p.stderr.strip().splitlines()[-1:]

    def secrets():
        r = t.http("GET", f"/api/v1/namespaces/{NS}/secrets?labelSelector=owner%3Dhelm")
        return len(r.json().get("items", []))

    steps = {}
    steps["install"] = helm_run("install", "rel", chart)
    steps["upgrade"] = helm_run("upgrade", "rel", chart, "--set", "runPolicy=Halted")
    steps["secrets_after_upgrade"] = secrets()
    steps["uninstall"] = helm_run("uninstall", "rel")
    steps["secrets_after_uninstall"] = secrets()
    steps["install_again"] = helm_run("install", "rel", chart)
    steps["uninstall_again"] = helm_run("uninstall", "rel")
    return Outcome(**steps)


@step
def microvm_status_defaulted_until_written(t):
    # The CRD defaults a missing status to observedGeneration 0 (so kstatus says InProgress
    # before the controller's first write): in the create response, a get and a list, never in
    # the creator's managed fields; a status write replaces it.
    created = t.http("POST", f"{MVM}?fieldManager=creator", vm("fresh"))
    got = t.http("GET", f"{MVM}/fresh").json()
    listed = [i.get("status") for i in t.http("GET", MVM).json()["items"]
              if i["metadata"]["name"] == "fresh"]
    written = t.http("PATCH", f"{MVM}/fresh/status?fieldManager=ctl",
                     {"status": {"observedGeneration": 1, "phase": "Pending"}},
                     content_type="application/merge-patch+json").json()
    return Outcome(code=created.status_code, created=created.json().get("status"),
                   got=got.get("status"), owners=owners(got), listed=listed,
                   written=written.get("status"), written_owners=owners(written))
