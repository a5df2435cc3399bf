"""A small ComfyUI client (standard library only): submit an API-format workflow, follow it over the
websocket, save its output files. Used by ``python -m quant_expand.cli run``.

The websocket part is the client side of RFC 6455 that ComfyUI's ``/ws`` needs: the upgrade handshake,
unmasked frames from the server (text, binary previews, ping, close; fragmented messages joined), and
masked pong/close frames back.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class ClientError(RuntimeError):
    pass


class WebSocket:
    def __init__(self, url: str, timeout: float = 600.0):
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("ws", "http"):
            raise ClientError(f"{url}: only plain ws:// / http:// servers are supported")
        self.sock = socket.create_connection((u.hostname, u.port or 80), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        request = (f"GET {path} HTTP/1.1\r\nHost: {u.hostname}:{u.port or 80}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(request.encode())
        self._buf = b""
        head = self._read_until(b"\r\n\r\n").decode("latin-1")
        status = head.split("\r\n", 1)[0]
        if " 101 " not in status + " ":
            raise ClientError(f"websocket upgrade refused by {url}: {status}")
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in head.split("\r\n")[1:] if line)}
        expected = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        if headers.get("sec-websocket-accept") != expected:
            raise ClientError(f"websocket handshake with {url}: wrong Sec-WebSocket-Accept")

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ClientError("connection closed during the websocket handshake")
            self._buf += chunk
        head, _, self._buf = self._buf.partition(marker)
        return head

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self._buf)))
            if not chunk:
                raise ClientError("the server closed the websocket")
            self._buf += chunk
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def _send(self, opcode: int, payload: bytes = b""):
        mask = os.urandom(4)  # client frames are always masked
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def recv(self):
        """The next message: ``str`` (text) or ``bytes`` (binary); ``None`` once the server closes."""
        message, first_opcode = b"", None
        while True:
            b0, b1 = self._read(2)
            fin, opcode, n = b0 & 0x80, b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x8:  # close: answer and stop
                try:
                    self._send(0x8, payload[:2])
                except OSError:
                    pass
                return None
            if opcode == 0x9:
                self._send(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            if opcode != 0x0:
                first_opcode = opcode
            message += payload
            if fin:
                return message.decode("utf-8") if first_opcode == 0x1 else message

    def close(self):
        try:
            self._send(0x8, struct.pack(">H", 1000))
        except OSError:
            pass
        self.sock.close()


def load_api_workflow(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        data = data["prompt"]
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise ClientError(f"{path} is an editor workflow; export it with Workflow > Export (API) "
                          "(or use the copy in example_workflows/api/)")
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        raise ClientError(f"{path}: not an API-format workflow (a JSON object of nodes with class_type)")
    return data


class ComfyClient:
    def __init__(self, server: str, timeout: float = 600.0):
        self.server = server.rstrip("/")
        if "://" not in self.server:
            self.server = "http://" + self.server
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex
        # proxy-free: ComfyUI usually runs on this machine or the local network
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _http(self, path: str, data: dict | None = None):
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.server + path, data=body,
                                     headers={"Content-Type": "application/json"} if body else {})
        try:
            with self._opener.open(req, timeout=self.timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except urllib.error.URLError as e:
            raise ClientError(f"cannot reach ComfyUI at {self.server}: {e.reason}") from None

    def submit(self, prompt: dict) -> str:
        status, body = self._http("/prompt", {"prompt": prompt, "client_id": self.client_id})
        try:
            answer = json.loads(body)
        except ValueError:
            answer = {"error": body[:500].decode("utf-8", "replace")}
        if status != 200:
            raise ClientError("ComfyUI refused the workflow:\n" + format_refusal(answer, prompt))
        return answer["prompt_id"]

    def run(self, prompt: dict, output_dir: str, log=print) -> dict:
        """Submit, follow, download. Returns ``{"prompt_id", "status", "files": [paths]}``."""
        ws_url = self.server.replace("http://", "ws://", 1) + f"/ws?clientId={self.client_id}"
        ws = WebSocket(ws_url, timeout=self.timeout)
        try:
            prompt_id = self.submit(prompt)
            log(f"queued {prompt_id} ({len(prompt)} nodes)")
            error = self._follow(ws, prompt_id, prompt, log)
        finally:
            ws.close()
        entry = self.history(prompt_id)
        files = [] if error else self.download(entry.get("outputs", {}), output_dir, log)
        return {"prompt_id": prompt_id, "status": "error" if error else "success", "error": error,
                "files": files, "outputs": entry.get("outputs", {})}

    def history(self, prompt_id: str, wait: float = 30.0) -> dict:
        """The prompt's /history entry. The server reports the end of a run over the websocket a moment
        before it records the history, so wait for the entry (briefly)."""
        deadline = time.monotonic() + wait
        while True:
            status, body = self._http(f"/history/{prompt_id}")
            entry = json.loads(body).get(prompt_id) if status == 200 else None
            if entry and entry.get("status", {}).get("completed") is not None or time.monotonic() > deadline:
                return entry or {}
            time.sleep(0.05)

    def _follow(self, ws: WebSocket, prompt_id: str, prompt: dict, log):
        def title(node):
            return f"{node} {prompt.get(str(node), {}).get('class_type', '')}".strip()

        while True:
            msg = ws.recv()
            if msg is None:
                raise ClientError("the server closed the websocket before the workflow finished")
            if not isinstance(msg, str):
                continue  # binary frames are previews
            event = json.loads(msg)
            kind, data = event.get("type"), event.get("data", {})
            if isinstance(data, dict) and data.get("prompt_id") not in (None, prompt_id):
                continue
            if kind == "execution_cached" and data.get("nodes"):
                log(f"cached: {', '.join(title(n) for n in data['nodes'])}")
            elif kind == "executing":
                if data.get("node") is None:
                    return None
                log(f"running {title(data['node'])}")
            elif kind == "progress":
                log(f"  {title(data.get('node'))}: {data.get('value')}/{data.get('max')}")
            elif kind == "executed":
                log(f"done {title(data.get('node'))}")
            elif kind == "execution_error":
                text = (f"{title(data.get('node_id'))} failed: {data.get('exception_type')}: "
                        f"{str(data.get('exception_message', '')).strip()}")
                log(text)
                return text
            elif kind == "execution_interrupted":
                return "interrupted"
            elif kind == "execution_success":
                return None

    def download(self, outputs: dict, output_dir: str, log=print) -> list[str]:
        saved = []
        for node_id, ui in outputs.items():
            for items in ui.values():
                for item in items if isinstance(items, list) else []:
                    if not (isinstance(item, dict) and "filename" in item and "type" in item):
                        continue
                    query = urllib.parse.urlencode({"filename": item["filename"],
                                                    "subfolder": item.get("subfolder", ""), "type": item["type"]})
                    status, body = self._http(f"/view?{query}")
                    if status != 200:
                        raise ClientError(f"GET /view?{query} -> {status}")
                    name = os.path.basename(item["filename"])
                    sub = os.path.normpath(item.get("subfolder", "")).lstrip(os.sep).replace("..", "_")
                    path = os.path.join(output_dir, sub if sub != "." else "", name)
                    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                    with open(path, "wb") as f:
                        f.write(body)
                    log(f"saved {path} ({len(body)} bytes, from node {node_id})")
                    saved.append(path)
        return saved


def format_refusal(answer: dict, prompt: dict) -> str:
    lines = []
    err = answer.get("error")
    if isinstance(err, dict):
        lines.append(f"{err.get('message', '')} {err.get('details', '')}".strip())
    elif err:
        lines.append(str(err))
    for node_id, info in (answer.get("node_errors") or {}).items():
        cls = info.get("class_type") or prompt.get(node_id, {}).get("class_type", "")
        for e in info.get("errors", []):
            lines.append(f"  node {node_id} {cls}: {e.get('message', '')}: {e.get('details', '')}")
    return "\n".join(lines)
