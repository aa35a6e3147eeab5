"""Validates `beamredir status -o json` output against docs/status.schema.json.

Usage: validate_status.py SCHEMA < DOCS

DOCS is one JSON document per line (as `status --watch -o json` prints them), or a single
pretty-printed document. The schema itself is checked against the draft 2020-12 metaschema
first. Prints every error and exits 1 if any document is invalid; prints "valid N" otherwise.
"""
import json
import sys

from jsonschema import Draft202012Validator


def main() -> int:
    with open(sys.argv[1]) as f:
        schema = json.load(f)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema", schema["$schema"]
    Draft202012Validator.check_schema(schema)
    validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    text = sys.stdin.read()
    lines = [l for l in text.splitlines() if l.strip()]
    try:
        docs = [json.loads(l) for l in lines]
    except json.JSONDecodeError:
        docs = [json.loads(text)]
    if not docs:
        print("no document on stdin", file=sys.stderr)
        return 1
    bad = 0
    for i, doc in enumerate(docs):
        for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
            bad += 1
            path = "/".join(str(p) for p in err.absolute_path)
            print(f"document {i}: at /{path}: {err.message}")
    if bad:
        return 1
    print(f"valid {len(docs)} (jsonschema {jsonschema_version()})")
    return 0


def jsonschema_version() -> str:
    from importlib.metadata import version

    return version("jsonschema")


if __name__ == "__main__":
    sys.exit(main())
