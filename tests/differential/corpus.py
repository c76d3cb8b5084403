"""The corpus: every step runs against both servers in order and returns an Outcome. Steps
share state per target through `t.state` (resource versions, continue tokens). Names are the
same on both servers; both start empty apart from the MicroVM CRD."""

import json
import threading
import time

from harness import Outcome, client_outcome, http_outcome, kubectl_outcome, temp_file

STEPS = []


def step(fn):
    STEPS.append(fn)
    return fn


NS = "diff"
CM = f"/api/v1/namespaces/{NS}/configmaps"
MVM = f"/apis/ignis.dev/v1alpha1/namespaces/{NS}/microvms"


def vm(name, vcpus=1, **extra):
    body = {"apiVersion": "ignis.dev/v1alpha1", "kind": "MicroVM",
            "metadata": {"name": name},
            "spec": {"resources": {"vcpus": vcpus, "memory": "256Mi"},
                     "kernel": {"path": "/boot/vmlinuz"}}}
    body["metadata"].update(extra.pop("metadata", {}))
    body["spec"].update(extra.pop("spec", {}))
    body.update(extra)
    return body


def cm(name, data=None, **meta):
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, **meta}, "data": data or {"a": "1"}}


def owners(obj):
    """managedFields as comparable (manager, operation, subresource, fieldsV1) tuples."""
    return sorted(
        (e.get("manager"), e.get("operation"), e.get("subresource", ""),
         json.dumps(e.get("fieldsV1"), sort_keys=True))
        for e in obj["metadata"].get("managedFields", []))


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def ld(field, data):
    return bytes([(field << 3) | 2]) + varint(len(data)) + data


def delete_options_pb(uid=None, policy="Background"):
    """A protobuf DeleteOptions as client-go sends it (Helm's uninstall, typed deletes)."""
    raw = b""
    if uid is not None:
        raw += ld(2, ld(1, uid.encode()))
    raw += ld(4, policy.encode())
    type_meta = ld(1, b"meta.k8s.io/v1") + ld(2, b"DeleteOptions")
    return b"k8s\x00" + ld(1, type_meta) + ld(2, raw)


# --- kubectl verbs ----------------------------------------------------------------------------

@step
def kubectl_create_namespace(t):
    return kubectl_outcome(t.kubectl("create", "namespace", NS))


@step
def kubectl_create_configmap_protobuf(t):
    # kubectl's typed client sends protobuf for core kinds.
    return kubectl_outcome(t.kubectl("-n", NS, "create", "configmap", "kc1",
                                     "--from-literal=a=1"))


@step
def kubectl_create_secret(t):
    return kubectl_outcome(t.kubectl("-n", NS, "create", "secret", "generic", "s1",
                                     "--from-literal=k=v"))


@step
def kubectl_get_configmap_jsonpath(t):
    return kubectl_outcome(t.kubectl("-n", NS, "get", "cm", "kc1", "-o",
                                     "jsonpath={.data.a}"), project=str.strip)


@step
def kubectl_apply_microvm(t):
    path = temp_file(json.dumps(vm("vm1", metadata={"labels": {"app": "web"}})))
    return kubectl_outcome(t.kubectl("-n", NS, "apply", "-f", path))


@step
def kubectl_apply_microvm_again_changed(t):
    path = temp_file(json.dumps(vm("vm1", 2, metadata={"labels": {"app": "web"}})))
    return kubectl_outcome(t.kubectl("-n", NS, "apply", "-f", path))


@step
def kubectl_apply_invalid_microvm(t):
    path = temp_file(json.dumps(vm("vm-bad", 0)))
    return kubectl_outcome(t.kubectl("-n", NS, "apply", "-f", path))


@step
def kubectl_apply_server_side(t):
    path = temp_file(json.dumps(vm("vm2")))
    return kubectl_outcome(t.kubectl("-n", NS, "apply", "--server-side", "-f", path))


@step
def kubectl_get_mvm_generation(t):
    return kubectl_outcome(t.kubectl("-n", NS, "get", "mvm", "vm1", "-o",
                                     "jsonpath={.metadata.generation} {.spec.resources.vcpus}"),
                           project=str.strip)


@step
def kubectl_label_and_annotate(t):
    a = t.kubectl("-n", NS, "label", "mvm", "vm1", "tier=front")
    b = t.kubectl("-n", NS, "annotate", "mvm", "vm1", "note=hello")
    return Outcome(label=kubectl_outcome(a).parts, annotate=kubectl_outcome(b).parts)


@step
def kubectl_bad_label(t):
    return kubectl_outcome(t.kubectl("-n", NS, "label", "mvm", "vm1", "bad_=x"))


@step
def kubectl_patch_merge(t):
    return kubectl_outcome(t.kubectl("-n", NS, "patch", "mvm", "vm1", "--type=merge", "-p",
                                     '{"spec":{"runPolicy":"Once"}}'))


@step
def kubectl_patch_json(t):
    return kubectl_outcome(t.kubectl("-n", NS, "patch", "mvm", "vm1", "--type=json", "-p",
                                     '[{"op":"replace","path":"/spec/runPolicy","value":"Halted"}]'))


@step
def kubectl_patch_strategic_on_crd_refused(t):
    return kubectl_outcome(t.kubectl("-n", NS, "patch", "mvm", "vm1", "--type=strategic", "-p",
                                     '{"spec":{"runPolicy":"Once"}}'))


@step
def kubectl_patch_strategic_configmap(t):
    return kubectl_outcome(t.kubectl("-n", NS, "patch", "cm", "kc1", "-p",
                                     '{"data":{"b":"2"}}'))


@step
def kubectl_replace(t):
    out = t.kubectl("-n", NS, "get", "cm", "kc1", "-o", "json")
    obj = json.loads(out.stdout)
    obj["data"]["c"] = "3"
    return kubectl_outcome(t.kubectl("-n", NS, "replace", "-f", "-", stdin=json.dumps(obj)))


@step
def kubectl_get_chunked(t):
    for i in range(3):
        t.kubectl("-n", NS, "create", "configmap", f"page{i}", "--from-literal=x=1")
    return kubectl_outcome(t.kubectl("-n", NS, "get", "cm", "--chunk-size=1", "-o",
                                     "name"), project=lambda s: sorted(s.split()))


@step
def kubectl_unknown_kind(t):
    path = temp_file(json.dumps({"apiVersion": "ignis.dev/v1alpha1", "kind": "Gadget",
                                 "metadata": {"name": "g"}}))
    proc = t.kubectl("-n", NS, "apply", "-f", path)
    # The point: kubectl reports the unknown kind, not a failed OpenAPI download.
    return Outcome(ok=proc.returncode == 0, openapi_failed="failed to download openapi" in proc.stderr,
                   no_match="no matches for kind" in proc.stderr)


@step
def kubectl_auth_can_i(t):
    return kubectl_outcome(t.kubectl("auth", "can-i", "create", "microvms.ignis.dev"),
                           project=str.strip)


@step
def kubectl_explain(t):
    return kubectl_outcome(t.kubectl("explain", "mvm.spec.resources"),
                           project=lambda s: "vcpus" in s)


@step
def kubectl_delete_configmap(t):
    return kubectl_outcome(t.kubectl("-n", NS, "delete", "cm", "page2"))


@step
def kubectl_delete_missing(t):
    return kubectl_outcome(t.kubectl("-n", NS, "delete", "cm", "nope"))


# --- raw HTTP: options, media types, bodies ------------------------------------------------------

@step
def http_dry_run_bogus(t):
    return http_outcome(t.http("POST", CM + "?dryRun=Bogus", cm("dr1")))


@step
def http_dry_run_all_stores_nothing(t):
    a = http_outcome(t.http("POST", CM + "?dryRun=All", cm("dr2")))
    b = http_outcome(t.http("GET", CM + "/dr2"))
    return Outcome(create=a.parts, get=b.parts)


@step
def http_field_validation_bogus(t):
    return http_outcome(t.http("POST", CM + "?fieldValidation=Bogus", cm("fv1")))


@step
def http_text_plain(t):
    return http_outcome(t.http("POST", CM, json.dumps(cm("tp1")), content_type="text/plain"))


@step
def http_no_content_type(t):
    return http_outcome(t.http("POST", CM, json.dumps(cm("nct1")), content_type=None),
                        project=lambda b: b["metadata"]["name"])


@step
def http_yaml_body(t):
    body = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: y1}\ndata: {a: b}\n"
    return http_outcome(t.http("POST", CM, body, content_type="application/yaml"),
                        project=lambda b: b["data"])


@step
def http_strict_unknown_and_duplicate(t):
    body = ('{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"st1","foo":1,'
            '"labels":{"a":"1","a":"2"}},"data":{"x":"y"},"bar":2}')
    return http_outcome(t.http("POST", CM + "?fieldValidation=Strict", body))


@step
def http_strict_unknown_crd_field(t):
    body = vm("st2", spec={"bogus": True})
    return http_outcome(t.http("POST", MVM + "?fieldValidation=Strict", body))


@step
def http_warn_unknown_crd_field(t):
    r = t.http("POST", MVM + "?fieldValidation=Warn", vm("st3", spec={"bogus": True}))
    return Outcome(code=r.status_code, warned="unknown field" in r.headers.get("Warning", ""))


@step
def http_wrong_kind_core(t):
    return http_outcome(t.http("POST", CM, {"kind": "Secret", "apiVersion": "v1",
                                            "metadata": {"name": "wk1"}}))


@step
def http_wrong_kind_crd(t):
    return http_outcome(t.http("POST", MVM, {**vm("wk2"), "kind": "Foo"}))


@step
def http_wrong_api_version(t):
    return http_outcome(t.http("POST", MVM, {**vm("wk3"), "apiVersion": "ignis.dev/v1"}))


@step
def http_not_an_object(t):
    return http_outcome(t.http("POST", CM, "[1,2]"))


@step
def http_deep_body(t):
    deep = "[" * 100_000 + "]" * 100_000
    started = time.monotonic()
    out = http_outcome(t.http("POST", CM, deep))
    t.state["deep_seconds"] = time.monotonic() - started
    return out


@step
def http_body_over_3mib(t):
    return http_outcome(t.http("POST", CM, cm("huge", {"a": "x" * (3200 * 1024)})))


@step
def http_configmap_and_secret_over_1mib(t):
    import base64
    big = "x" * (1100 * 1024)
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bigs"},
              "data": {"a": base64.b64encode(big.encode()).decode()}}
    return Outcome(cm=http_outcome(t.http("POST", CM, cm("bigc", {"a": big}))).parts,
                   secret=http_outcome(t.http("POST", f"/api/v1/namespaces/{NS}/secrets",
                                              secret)).parts)


@step
def http_object_over_etcd_limit(t):
    return http_outcome(t.http("POST", MVM, vm("huge", spec={"userData": "x" * (1600 * 1024)})))


@step
def http_invalid_metadata(t):
    body = cm("lbl", labels={"bad key": "v", "k": "x" * 64},
              annotations={"Bad/Key/x": "1"}, finalizers=["not ok"],
              ownerReferences=[{"apiVersion": "v1", "kind": "ConfigMap", "name": "c"}])
    return http_outcome(t.http("POST", CM, body))


@step
def http_annotations_too_large(t):
    return http_outcome(t.http("POST", CM, cm("ann", annotations={"a": "b" * (256 * 1024)})))


@step
def http_crd_finalizer_without_slash(t):
    r = t.http("POST", MVM, vm("fin1", metadata={"finalizers": ["plain"]}))
    return Outcome(code=r.status_code, warned="finalizer" in r.headers.get("Warning", ""))


@step
def http_namespace_with_dot(t):
    return http_outcome(t.http("POST", "/api/v1/namespaces", {"metadata": {"name": "a.b"}}))


@step
def http_namespace_too_long(t):
    return http_outcome(t.http("POST", "/api/v1/namespaces", {"metadata": {"name": "a" * 64}}))


@step
def http_bad_object_name(t):
    return http_outcome(t.http("POST", MVM, vm("Bad_Name")))


@step
def http_generate_name(t):
    body = vm("")
    body["metadata"] = {"generateName": "gen-"}
    return http_outcome(t.http("POST", MVM, body),
                        project=lambda b: b["metadata"]["name"].startswith("gen-"))


@step
def http_no_name(t):
    body = vm("")
    body["metadata"] = {}
    return http_outcome(t.http("POST", MVM, body))


@step
def http_missing_namespace(t):
    return http_outcome(t.http("POST", "/api/v1/namespaces/nowhere/configmaps", cm("x")))


@step
def http_already_exists(t):
    return http_outcome(t.http("POST", MVM, vm("vm1")))


@step
def http_get_missing(t):
    return http_outcome(t.http("GET", MVM + "/nope"))


@step
def http_no_such_resource(t):
    return http_outcome(t.http("GET", f"/api/v1/namespaces/{NS}/widgets"))


@step
def http_put_crd_without_resource_version(t):
    return http_outcome(t.http("PUT", MVM + "/vm2", vm("vm2")))


@step
def http_put_core_without_resource_version(t):
    return http_outcome(t.http("PUT", CM + "/kc1", cm("kc1", {"z": "1"})),
                        project=lambda b: b["data"])


@step
def http_put_stale_resource_version(t):
    live = t.http("GET", CM + "/kc1").json()
    stale = dict(live, metadata=dict(live["metadata"], resourceVersion="1"))
    return http_outcome(t.http("PUT", CM + "/kc1", stale))


@step
def http_put_name_mismatch(t):
    return http_outcome(t.http("PUT", CM + "/kc1", cm("other")))


@step
def http_merge_patch_changes_name(t):
    return http_outcome(t.http("PATCH", MVM + "/vm1", {"metadata": {"name": "vm9"}},
                               content_type="application/merge-patch+json"))


@step
def http_merge_patch_changes_namespace(t):
    return http_outcome(t.http("PATCH", MVM + "/vm1", {"metadata": {"namespace": "default"}},
                               content_type="application/merge-patch+json"))


@step
def http_merge_patch_changes_uid(t):
    return http_outcome(t.http("PATCH", CM + "/kc1", {"metadata": {"uid": "abc"}},
                               content_type="application/merge-patch+json"))


@step
def http_json_patch_test_fails(t):
    return http_outcome(t.http("PATCH", CM + "/kc1",
                               [{"op": "test", "path": "/data/a", "value": "nope"}],
                               content_type="application/json-patch+json"))


@step
def http_patch_unknown_type(t):
    return http_outcome(t.http("PATCH", CM + "/kc1", {"data": {}}, content_type="application/json"))


@step
def http_force_on_merge_patch(t):
    return http_outcome(t.http("PATCH", CM + "/kc1?force=true", {"data": {"q": "1"}},
                               content_type="application/merge-patch+json"))


@step
def http_apply_without_field_manager(t):
    return http_outcome(t.http("PATCH", CM + "/kc1", cm("kc1"),
                               content_type="application/apply-patch+yaml"))


@step
def http_field_selectors(t):
    out = {}
    for path, sel in [(MVM, "spec.runPolicy=Always"), (MVM, "metadata.name=vm1"),
                      (CM, "data.a=1"), (f"/api/v1/namespaces/{NS}/secrets", "type=Opaque"),
                      ("/api/v1/namespaces", "metadata.namespace=x"),
                      ("/api/v1/namespaces", "status.phase=Active"), (CM, "nonsense")]:
        out[f"{path}?{sel}"] = http_outcome(t.http("GET", f"{path}?fieldSelector={sel}")).parts
    return Outcome(**out)


@step
def http_label_selector_invalid(t):
    return http_outcome(t.http("GET", CM + "?labelSelector=a%20b"))


@step
def http_paging(t):
    first = t.http("GET", CM + "?limit=2").json()
    meta = first["metadata"]
    second = t.http("GET", CM + f"?limit=100&continue={meta['continue']}").json()
    names = [i["metadata"]["name"] for i in first["items"] + second["items"]]
    return Outcome(first=len(first["items"]), has_continue=bool(meta.get("continue")),
                   remaining=meta.get("remainingItemCount"), same_rv=
                   second["metadata"]["resourceVersion"] == meta["resourceVersion"],
                   total=len(names), sorted=names == sorted(names))


@step
def http_bad_continue(t):
    return http_outcome(t.http("GET", CM + "?limit=1&continue=garbage"))


@step
def http_self_subject_access_review(t):
    body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": {"verb": "delete", "resource": "secrets",
                                            "namespace": NS}}}
    return http_outcome(t.http("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                               body), project=lambda b: b["status"]["allowed"])


@step
def http_openapi_v2(t):
    r = t.http("GET", "/openapi/v2", headers={"Accept": "application/json"})
    return Outcome(code=r.status_code, swagger=r.json().get("swagger"))


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
