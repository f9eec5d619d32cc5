#!/usr/bin/env python3
"""Runs the Python examples of the Sekoia.io intake documentation against the forwarder.

Why: the HTTP source promises that an application written for the Sekoia.io intake only has to
change its URL. The examples below are copied unchanged from the intake's documentation
(shared/intake-api.md); the only change, made at run time, is the base URL
`https://intake.sekoia.io`, replaced by the value of the environment variable FORWARDER_URL.

Two quirks of the documentation are kept on purpose, since real applications copied them:
- some examples call `request.auth.HTTPBasicAuth`, a typo for `requests.auth`: each example runs
  with the name `request` bound to the `requests` module, as a reader who fixed the typo would;
- `HTTPBasicAuth(None, key)` sends the user name "None"; the key is the password, which is what
  the intake reads.

Each answer must be a 200 carrying `{"event_id": uuid}` or `{"event_ids": [uuid, ...]}` with one
id per event sent.

Usage:
    FORWARDER_URL=http://127.0.0.1:10080 python3 tests/python/test_intake_examples.py
Optional: INTAKE_API_MD=path/to/intake-api.md also checks that the examples below are still
exactly those of the documentation.

Prints one line per example, then "N passed, M failed"; exits 1 if any failed, 2 if it cannot
run at all.
"""

import os
import re
import sys
import textwrap
import traceback
import uuid

try:
    import requests
except ImportError:
    print("the Python package `requests` is required (pip install requests)", file=sys.stderr)
    sys.exit(2)

DOC_BASE_URL = "https://intake.sekoia.io"

# (name, expected answer, code): the expected answer is "event_id" for one id, or the number of
# ids in "event_ids".
EXAMPLES = [
    (
        'plain, key as header',
        "event_id",
        r'''
import requests

headers = {"X-SEKOIAIO-INTAKE-KEY": "YOUR_INTAKE_KEY"}
content = "[764008:0] info: 198.51.100.10 example.org. A IN"
response = requests.post("https://intake.sekoia.io/plain", data=content, headers=headers)
print(response.text) # (1)
''',
    ),
    (
        'plain, key through HTTP Basic auth',
        "event_id",
        r'''
import requests

auth = request.auth.HTTPBasicAuth(None, "YOUR_INTAKE_KEY")
content = "[764008:0] info: 198.51.100.10 example.org. A IN"
response = requests.post("https://intake.sekoia.io/plain", data=content, auth=auth)
print(response.text) # (1)
''',
    ),
    (
        'plain, key through query string',
        "event_id",
        r'''
import requests

params = {"intake_key": "YOUR_INTAKE_KEY"}
content = "[764008:0] info: 198.51.100.10 example.org. A IN"
response = requests.post("https://intake.sekoia.io/plain", data=content, params=params)
print(response.text) # (1)
''',
    ),
    (
        'plain/batch, key as header',
        2,
        r'''
import requests

headers = {"X-SEKOIAIO-INTAKE-KEY": "YOUR_INTAKE_KEY"}
events = ["[764008:0] info: 198.51.100.10 example.org. A IN", "[764023:0] info: 2.34.100.56 text.org. A IN"]
content = "\n".join(events)
response = requests.post("https://intake.sekoia.io/plain/batch", data=content, headers=headers)
print(response.text) # (1)
''',
    ),
    (
        'plain/batch, key through HTTP Basic auth',
        2,
        r'''
import requests

auth = request.auth.HTTPBasicAuth(None, "YOUR_INTAKE_KEY")
events = ["[764008:0] info: 198.51.100.10 example.org. A IN", "[764023:0] info: 2.34.100.56 text.org. A IN"]
content = "\n".join(events)
response = requests.post("https://intake.sekoia.io/plain/batch", data=content, auth=auth)
print(response.text) # (1)
''',
    ),
    (
        'plain/batch, key through query string',
        2,
        r'''
import requests

params = {"intake_key": "YOUR_INTAKE_KEY"}
events = ["[764008:0] info: 198.51.100.10 example.org. A IN", "[764023:0] info: 2.34.100.56 text.org. A IN"]
content = "\n".join(events)
response = requests.post("https://intake.sekoia.io/plain/batch", data=content, params=params)
print(response.text) # (1)
''',
    ),
    (
        'jsons, key as header',
        2,
        r'''
import requests

headers = {"X-SEKOIAIO-INTAKE-KEY": "YOUR_INTAKE_KEY"}
events = ["[764008:0] info: 198.51.100.10 example.org. A IN", "[764023:0] info: 2.34.100.56 text.org. A IN"]
response = requests.post("https://intake.sekoia.io/jsons", json=events, headers=headers)
print(response.text) # (1)
''',
    ),
    (
        'jsons, key through HTTP Basic auth',
        2,
        r'''
import requests

auth = request.auth.HTTPBasicAuth(None, "YOUR_INTAKE_KEY")
events = ["[764008:0] info: 198.51.100.10 example.org. A IN", "[764023:0] info: 2.34.100.56 text.org. A IN"]
response = requests.post("https://intake.sekoia.io/jsons", json=events, auth=auth)
print(response.text) # (1)
''',
    ),
    (
        'jsons, key through query string',
        2,
        r'''
import requests

params = {"intake_key": "YOUR_INTAKE_KEY"}
events = ["[764008:0] info: 198.51.100.10 example.org. A IN", "[764023:0] info: 2.34.100.56 text.org. A IN"]
response = requests.post("https://intake.sekoia.io/jsons", json=events, params=params)
print(response.text) # (1)
''',
    ),
    (
        'array, keys and timestamp in the body',
        2,
        r'''
import requests

events = [
    {
        "timestamp": "2021-04-05T21:33:31+02:00", # (1)
        "intake_key": "YOUR_INTAKE_KEY",
        "json": "[764008:0] info: 198.51.100.10 example.org. A IN",
    },
    {
        "intake_key": "ANOTHER_INTAKE_KEY",
        "json": "[764023:0] info: 2.34.100.56 text.org. A IN",
    },
]
response = requests.post("https://intake.sekoia.io/array", json=events)
print(response.text) # (2)
''',
    ),
    (
        'structured event',
        "event_id",
        r'''
import requests

content = {"intake_key": "YOUR_INTAKE_KEY", "json": "[764008:0] info: 198.51.100.10 example.org. A IN"}
response = requests.post("https://intake.sekoia.io", json=content)
print(response.text) # (1)
''',
    ),
    (
        'structured event, quoted JSON',
        "event_id",
        r'''
import requests
import json

structured_log = {"key": "value"}
content = {"intake_key": "YOUR_INTAKE_KEY", "json": json.dumps(structured_log)}
response = requests.post("https://intake.sekoia.io", json=content)
print(response.text) # (1)
''',
    ),
    (
        'structured batch',
        2,
        r'''
import requests

content = {"intake_key": "YOUR_INTAKE_KEY", "jsons": ["[764008:0] info: 198.51.100.10 example.org. A IN", "[764023:0] info: 2.34.100.56 text.org. A IN"]}
response = requests.post("https://intake.sekoia.io/batch", json=content)
print(response.text) # (1)
''',
    ),
]


def check_answer(response, expected):
    """Raises AssertionError unless `response` acknowledges the events as the intake would."""
    assert response.status_code == 200, f"status {response.status_code}: {response.text}"
    answer = response.json()
    if expected == "event_id":
        assert set(answer) == {"event_id"}, f"expected {{\"event_id\": ...}}, got {answer}"
        ids = [answer["event_id"]]
    else:
        assert set(answer) == {"event_ids"}, f"expected {{\"event_ids\": [...]}}, got {answer}"
        ids = answer["event_ids"]
        assert len(ids) == expected, f"expected {expected} event ids, got {len(ids)}: {answer}"
    for event_id in ids:
        assert isinstance(event_id, str), f"an event id is not a string: {event_id!r}"
        uuid.UUID(event_id)


def run_example(code, base_url):
    """Runs one example as written, against `base_url`; returns its `response`."""
    code = code.replace(DOC_BASE_URL, base_url)
    namespace = {"__name__": "__example__", "request": requests}
    exec(compile(code, "<example>", "exec"), namespace)
    return namespace["response"]


def doc_examples(path):
    """The Python code blocks of the markdown file at `path`, dedented."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    blocks = re.findall(r"^([ \t]*)```python\n(.*?)^\1```", text, re.S | re.M)
    return [textwrap.dedent(block) for _, block in blocks]


def main():
    base_url = os.environ.get("FORWARDER_URL", "").rstrip("/")
    if not base_url:
        print("set FORWARDER_URL to the forwarder's base URL, e.g. http://127.0.0.1:10080",
              file=sys.stderr)
        return 2
    passed = failed = 0
    doc = os.environ.get("INTAKE_API_MD")
    if doc:
        documented = doc_examples(doc)
        ours = [code.lstrip("\n") for _, _, code in EXAMPLES]
        if documented == ours:
            passed += 1
            print(f"ok      the examples are those of {doc}")
        else:
            failed += 1
            print(f"FAILED  the examples differ from those of {doc}")
    for name, expected, code in EXAMPLES:
        try:
            check_answer(run_example(code, base_url), expected)
        except Exception:  # any failure of an example is a failed test, with its traceback
            failed += 1
            print(f"FAILED  {name}")
            traceback.print_exc()
        else:
            passed += 1
            print(f"ok      {name}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
