#!/usr/bin/python3
"""A small Docker-token-auth server for the e2e tests, in the manner of
Docker Hub's auth service (https://auth.docker.io/token).

CNCF distribution configured with

    auth:
      token:
        realm: http://127.0.0.1:PORT/token
        service: <service>
        issuer: <issuer>
        rootcertbundle: <cert.pem written by `gen-cert`>

sends clients a `WWW-Authenticate: Bearer realm=...,service=...,scope=...`
challenge; clients ask this server for a token and retry with it.

Tokens are JWTs signed with ES256 whose header carries the signing
certificate (`x5c`), which distribution verifies against `rootcertbundle`.
The `access` claim grants, per requested `repository:<name>:<actions>` scope:

  * `pull` to anyone, anonymous included, on public repositories;
  * `pull` on private repositories (names starting with one of the
    --private prefixes) only to a user with valid credentials;
  * `push` only to users marked "push" in the users file.

Valid credentials with nothing granted still get a token with an empty
`access` list (as Docker Hub does); distribution then answers
`401 insufficient_scope`. Wrong credentials get 401 from this server.
Both `GET /token` (HTTP Basic credentials, as docker login, skopeo and
stowage send them) and `POST /token` (OAuth2 password grant, as containerd
tries first) are served.

Every request is appended to --log as one JSON object per line
(method, account, scope, granted, status, user_agent), so tests can count
token requests.

Usage:
  token_server.py gen-cert DIR
      writes DIR/key.pem (EC P-256) and DIR/cert.pem (self-signed)
  token_server.py serve --listen HOST:PORT --dir DIR --issuer ISS
      --service SVC --users USERS.json [--private PREFIX ...] --log FILE
      USERS.json: {"name": {"password": "...", "push": true}, ...}

Uses Debian's python3-jwt and python3-cryptography (run with /usr/bin/python3).
"""
import argparse
import base64
import datetime
import hmac
import json
import os
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

TOKEN_LIFETIME = 300


def gen_cert(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stowage e2e token signer")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    with open(os.path.join(directory, "key.pem"), "wb") as f:
        f.write(key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))
    with open(os.path.join(directory, "cert.pem"), "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


class Authority:
    def __init__(self, args):
        with open(os.path.join(args.dir, "key.pem"), "rb") as f:
            self.key = serialization.load_pem_private_key(f.read(), password=None)
        with open(os.path.join(args.dir, "cert.pem"), "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        self.x5c = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
        with open(args.users) as f:
            self.users = json.load(f)
        self.issuer = args.issuer
        self.service = args.service
        self.private = tuple(args.private or ())
        self.log_path = args.log
        self.log_lock = threading.Lock()

    def log(self, entry: dict) -> None:
        line = json.dumps(entry, sort_keys=True)
        with self.log_lock, open(self.log_path, "a") as f:
            f.write(line + "\n")

    def check(self, username, password):
        """The user name if the credentials are valid, None for anonymous,
        False for wrong credentials."""
        if username is None:
            return None
        user = self.users.get(username)
        if user is None or not hmac.compare_digest(user["password"].encode(), (password or "").encode()):
            return False
        return username

    def grant(self, user, scopes):
        access = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) < 3:
                continue
            kind, name, actions = parts[0], ":".join(parts[1:-1]), parts[-1].split(",")
            if kind != "repository":
                continue
            allowed = set()
            private = name.startswith(self.private)
            if user or not private:
                allowed.add("pull")
            if user and self.users[user].get("push"):
                allowed.update({"push", "pull", "delete", "*"})
            granted = [a for a in actions if a in allowed]
            if granted:
                access.append({"type": kind, "name": name, "actions": granted})
        return access

    def token(self, user, access) -> dict:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": self.service,
            "exp": now + TOKEN_LIFETIME,
            "nbf": now - 10,
            "iat": now,
            "jti": base64.urlsafe_b64encode(os.urandom(12)).decode(),
            "access": access,
        }
        signed = jwt.encode(claims, self.key, algorithm="ES256", headers={"x5c": self.x5c})
        issued = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
        return {
            "token": signed,
            "access_token": signed,
            "expires_in": TOKEN_LIFETIME,
            "issued_at": issued.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }


class Handler(BaseHTTPRequestHandler):
    server_version = "stowage-e2e-token/1"
    authority: Authority = None  # set in main

    def log_message(self, fmt, *args):  # quiet: requests go to --log
        pass

    def reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def basic_credentials(self):
        header = self.headers.get("Authorization", "")
        if not header.lower().startswith("basic "):
            return None, None
        try:
            raw = base64.b64decode(header[6:].strip()).decode()
        except Exception:
            return "", ""
        user, _, password = raw.partition(":")
        return user, password

    def serve_token(self, method, params, username, password):
        a = self.authority
        path = urllib.parse.urlsplit(self.path).path
        scopes = []
        for s in params.get("scope", []):
            scopes.extend(s.split(" "))
        entry = {
            "method": method,
            "account": username,
            "scope": scopes,
            "user_agent": self.headers.get("User-Agent", ""),
        }
        if path != "/token":
            entry.update(status=404, granted=[])
            a.log(entry)
            return self.reply(404, {"errors": [{"code": "NOT_FOUND", "message": path}]})
        service = (params.get("service") or [a.service])[0]
        if service != a.service:
            entry.update(status=400, granted=[])
            a.log(entry)
            return self.reply(400, {"errors": [{"code": "DENIED", "message": f"unknown service {service!r}"}]})
        user = a.check(username, password)
        if user is False:
            entry.update(status=401, granted=[])
            a.log(entry)
            return self.reply(401, {"errors": [{"code": "UNAUTHORIZED", "message": "incorrect username or password"}]})
        access = a.grant(user, scopes)
        entry.update(status=200, granted=access)
        a.log(entry)
        return self.reply(200, a.token(user, access))

    def do_GET(self):
        params = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        username, password = self.basic_credentials()
        self.serve_token("GET", params, username, password)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        form = urllib.parse.parse_qs(self.rfile.read(length).decode())
        grant_type = (form.get("grant_type") or [""])[0]
        if grant_type != "password":
            # No refresh tokens here; containerd falls back to GET.
            self.authority.log({"method": "POST", "account": None, "scope": form.get("scope", []),
                                "status": 400, "granted": [],
                                "user_agent": self.headers.get("User-Agent", "")})
            return self.reply(400, {"error": "unsupported_grant_type"})
        username = (form.get("username") or [None])[0]
        password = (form.get("password") or [""])[0]
        self.serve_token("POST", form, username, password)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gen-cert")
    g.add_argument("dir")
    s = sub.add_parser("serve")
    s.add_argument("--listen", required=True)
    s.add_argument("--dir", required=True)
    s.add_argument("--issuer", required=True)
    s.add_argument("--service", required=True)
    s.add_argument("--users", required=True)
    s.add_argument("--private", action="append")
    s.add_argument("--log", required=True)
    args = parser.parse_args()
    if args.command == "gen-cert":
        gen_cert(args.dir)
        return 0
    Handler.authority = Authority(args)
    host, _, port = args.listen.rpartition(":")
    httpd = ThreadingHTTPServer((host, int(port)), Handler)
    httpd.daemon_threads = True
    print(f"token server listening on {args.listen}", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
