"""The corpus: every step runs against both servers in order and returns an Outcome. Steps
share state per target through `t.state` (resource versions, continue tokens). Names are the
same on both servers; both start empty apart from the MicroVM CRD."""

import json
import time

from harness import Outcome, http_outcome, kubectl_outcome, temp_file

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
