"""The Python side of a test bed agent (see tests/netbed.py Agent).

Reads one JSON request per line from stdin ({"code", "expr"}), runs ``code`` in
one persistent namespace, and answers one JSON line with the value of
``expr`` or the exception's type and message. Anything the snippets print goes
to stderr, so stdout carries only answers.
"""

import json
import sys
import time
import traceback

answers = sys.stdout
sys.stdout = sys.stderr
namespace = {"__name__": "__netbed__", "time": time}

for line in sys.stdin:
    request = json.loads(line)
    try:
        exec(request["code"], namespace)
        value = eval(request["expr"], namespace)
        reply = {"ok": True, "value": json.loads(json.dumps(value, default=repr))}
    except BaseException as exc:  # every failure goes back to the test
        traceback.print_exc()
        reply = {"ok": False, "type": type(exc).__name__, "message": str(exc)}
    answers.write(json.dumps(reply) + "\n")
    answers.flush()
