#!/usr/bin/env python3
"""A loopback stand-in for the AWS and GCP instance metadata servers, in their documented
formats, for the preemption-notice tests. Prints its port, then serves until killed.

POST /control/aws {"action": "terminate", "time": "..."} schedules an AWS spot interruption;
POST /control/gcp TRUE|FALSE sets the GCP preempted flag. IMDSv2 is enforced: the AWS document
is served only with a token from PUT /latest/api/token."""
import http.server, json, sys, secrets

state = {"aws": None, "gcp": "FALSE", "token": secrets.token_hex(8)}

class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, code, body=b"", ctype="text/plain"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self):
        if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            return self.reply(200, state["token"].encode())
        self.reply(400)

    def do_GET(self):
        if self.path == "/latest/meta-data/spot/instance-action":
            if self.headers.get("X-aws-ec2-metadata-token") != state["token"]:
                return self.reply(401)
            if state["aws"] is None:
                return self.reply(404, b"Not Found")
            return self.reply(200, json.dumps(state["aws"]).encode(), "application/json")
        if self.path == "/computeMetadata/v1/instance/preempted":
            if self.headers.get("Metadata-Flavor") != "Google":
                return self.reply(403)
            return self.reply(200, state["gcp"].encode())
        self.reply(404)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        if self.path == "/control/aws":
            state["aws"] = json.loads(body)
        elif self.path == "/control/gcp":
            state["gcp"] = body.strip()
        else:
            return self.reply(404)
        self.reply(200)

server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
