"""Validates ServiceMonitor and PrometheusRule documents against
prometheus-operator's CRD schemas, as the PyPI package
cloudcoil.models.prometheus_operator carries them (pydantic models
generated from the operator's CustomResourceDefinitions: field names,
types, enums and patterns such as the Duration format of `interval`).

The models ignore fields they do not know, where the API server would
prune them silently; so a document must also survive a round trip
through its model unchanged: a field the CRD does not define, or a value
the model rewrites, is an error here.

Usage: python3 crds.py FILE...   (prints OK/ERROR per document; exit 1 on
any error). Run by crates/cli/tests/kubernetes (cargo test --test kubernetes).
"""

import sys

import pydantic
import yaml
from cloudcoil.models.prometheus_operator import v1

MODELS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): v1.ServiceMonitor,
    ("monitoring.coreos.com/v1", "PrometheusRule"): v1.PrometheusRule,
}


def lost(sent, back, path=""):
    """The paths of `sent` that `back` dropped or changed."""
    if isinstance(sent, dict):
        if not isinstance(back, dict):
            return [path or "."]
        out = []
        for key, value in sent.items():
            if key not in back:
                out.append(f"{path}.{key} (not in the CRD)")
            else:
                out += lost(value, back[key], f"{path}.{key}")
        return out
    if isinstance(sent, list):
        if not isinstance(back, list) or len(sent) != len(back):
            return [path]
        return [p for i, (a, b) in enumerate(zip(sent, back)) for p in lost(a, b, f"{path}[{i}]")]
    return [] if sent == back else [f"{path} ({sent!r} read as {back!r})"]


def main(paths):
    failed = False
    for path in paths:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for doc in docs:
            key = (doc.get("apiVersion"), doc.get("kind"))
            what = f"{path}: {key[1]}/{doc.get('metadata', {}).get('name')}"
            model = MODELS.get(key)
            if model is None:
                print(f"ERROR {what}: not a prometheus-operator kind: {key}")
                failed = True
                continue
            try:
                parsed = model.model_validate(doc)
            except pydantic.ValidationError as e:
                print(f"ERROR {what}: {' | '.join(str(e).splitlines())}")
                failed = True
                continue
            back = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
            problems = lost(doc, back)
            if problems:
                print(f"ERROR {what}: {'; '.join(problems)}")
                failed = True
            else:
                print(f"OK {what}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
