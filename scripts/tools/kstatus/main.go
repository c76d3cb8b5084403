// Command kstatus prints the verdict of kstatus (sigs.k8s.io/cli-utils/pkg/kstatus/status),
// the library Flux, Helm's watcher and kpt use, for each object in the YAML or JSON files named
// on the command line: one JSON line per object with its name, status and message. A file may
// hold several documents separated by "---" and `kind: List` objects (kubectl get -o yaml).
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"regexp"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
	"sigs.k8s.io/yaml"
)

type verdict struct {
	File    string `json:"file"`
	Kind    string `json:"kind"`
	Name    string `json:"name"`
	Status  string `json:"status"`
	Reason  string `json:"reason,omitempty"`
	Message string `json:"message"`
}

var separator = regexp.MustCompile(`(?m)^---\s*$`)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: kstatus FILE...")
		os.Exit(2)
	}
	out := json.NewEncoder(os.Stdout)
	for _, file := range os.Args[1:] {
		if err := judge(file, out); err != nil {
			fmt.Fprintf(os.Stderr, "kstatus: %s: %v\n", file, err)
			os.Exit(1)
		}
	}
}

func judge(file string, out *json.Encoder) error {
	data, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	for _, doc := range separator.Split(string(data), -1) {
		if len(bytes.TrimSpace([]byte(doc))) == 0 {
			continue
		}
		raw, err := yaml.YAMLToJSON([]byte(doc))
		if err != nil {
			return err
		}
		// The apimachinery decoder, as clients use it: integers stay int64, which kstatus needs.
		decoded, err := runtime.Decode(unstructured.UnstructuredJSONScheme, raw)
		if err != nil {
			return err
		}
		var items []*unstructured.Unstructured
		switch o := decoded.(type) {
		case *unstructured.UnstructuredList:
			for i := range o.Items {
				items = append(items, &o.Items[i])
			}
		case *unstructured.Unstructured:
			items = append(items, o)
		default:
			return fmt.Errorf("not an object: %T", decoded)
		}
		for _, u := range items {
			res, err := status.Compute(u)
			if err != nil {
				return fmt.Errorf("%s: %w", u.GetName(), err)
			}
			v := verdict{File: file, Kind: u.GetKind(), Name: u.GetName(), Status: res.Status.String(), Message: res.Message}
			for _, c := range res.Conditions {
				if c.Status == "True" {
					v.Reason = c.Reason
				}
			}
			if err := out.Encode(v); err != nil {
				return err
			}
		}
	}
	return nil
}
