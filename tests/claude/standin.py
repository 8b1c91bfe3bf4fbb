"""A stand-in for the model behind Claude Code, for tests/tests/claude_code.rs.

The real model cannot be reached here, so this answers the Messages API (streaming, as
Claude Code asks for it) with a script: each request that offers the Bash tool gets the
next scripted command as a `tool_use` block, and once the script is done every request
gets the text "done". Everything else is the real Claude Code: its hooks, its Bash tool and
its permission checks. Each tool result Claude Code sends back is written to the log.

Usage: standin.py PORT COMMANDS_JSON LOG. Prints the port it listens on (PORT 0: any).
"""

import http.server
import json
import sys
import threading

COMMANDS = json.loads(sys.argv[2])
LOG = open(sys.argv[3], "a", encoding="utf-8")
LOCK = threading.Lock()
NEXT = [0]
SEEN = set()


def log(line):
    with LOCK:
        LOG.write(line + "\n")
        LOG.flush()


def message(blocks, stop_reason):
    """The server-sent events of one assistant message holding `blocks`."""
    usage = {"input_tokens": 10, "output_tokens": 5}
    events = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_standin",
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-standin",
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": usage,
                },
            },
        )
    ]
    for index, (start, delta) in enumerate(blocks):
        events.append(
            ("content_block_start", {"type": "content_block_start", "index": index, "content_block": start})
        )
        events.append(("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    events.append(
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": 5},
            },
        )
    )
    events.append(("message_stop", {"type": "message_stop"}))
    return events


def bash_call(command, number):
    start = {"type": "tool_use", "id": f"toolu_standin_{number}", "name": "Bash", "input": {}}
    arguments = json.dumps({"command": command, "description": "run the scripted command"})
    return (start, {"type": "input_json_delta", "partial_json": arguments})


def text(words):
    return ({"type": "text", "text": ""}, {"type": "text_delta", "text": words})


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer_json(self, value):
        data = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        length = int(self.headers.get("content-length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        if "count_tokens" in self.path:
            self.answer_json({"input_tokens": 10})
            return
        # Each request carries the whole conversation: a tool result is logged once.
        for message_ in body.get("messages") or []:
            content = message_.get("content")
            for block in content if isinstance(content, list) else []:
                if isinstance(block, dict) and block.get("type") == "tool_result":
                    with LOCK:
                        fresh = block.get("tool_use_id") not in SEEN
                        SEEN.add(block.get("tool_use_id"))
                    if fresh:
                        log("TOOL_RESULT " + json.dumps(block))
        offers_bash = any(tool.get("name") == "Bash" for tool in body.get("tools", []))
        with LOCK:
            number = NEXT[0]
            scripted = offers_bash and number < len(COMMANDS)
            if scripted:
                NEXT[0] += 1
        if scripted:
            log("TOOL_USE " + COMMANDS[number])
            events = message([bash_call(COMMANDS[number], number)], "tool_use")
        else:
            events = message([text("done")], "end_turn")
        # One answer per connection: closing it is what ends the stream for the client.
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("connection", "close")
        self.close_connection = True
        self.end_headers()
        for name, data in events:
            self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
        self.wfile.flush()

    def do_GET(self):
        self.answer_json({})


server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
