"""A small ComfyUI client (standard library only): submit an API-format workflow, follow it over the
websocket, save its output files. Used by ``python -m quant_expand.cli run``.

The websocket part is the client side of RFC 6455 that ComfyUI's ``/ws`` needs: the upgrade handshake,
unmasked frames from the server (text, binary previews, ping, close; fragmented messages joined), and
masked pong/close frames back.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
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
CONNECT_TIMEOUT = 10.0  # seconds to open the connection; a server that is up answers at once


class ClientError(RuntimeError):
    """What went wrong, in one line that names the server or the file and what to do."""


def server_url(server: str) -> str:
    """``server`` as ``http://host[:port]`` with no trailing slash (``http://`` is added when missing)."""
    url = server.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    u = urllib.parse.urlsplit(url)
    if u.scheme != "http":
        raise ClientError(f"server {server}: only plain http:// addresses are supported (ComfyUI serves http unless "
                          f"started with --tls-keyfile); pass --server http://HOST:PORT")
    try:
        u.port
    except ValueError:
        u = None
    if u is None or not u.hostname:
        raise ClientError(f"server {server}: not an address; pass --server http://HOST:PORT, e.g. http://127.0.0.1:8188")
    return url


def connection_problem(e: BaseException, timeout: float) -> str:
    """A network error in words: why a server could not be reached or stopped answering."""
    if isinstance(e, ConnectionRefusedError):
        return "connection refused: nothing listens there"
    if isinstance(e, socket.gaierror):
        return "unknown host name"
    if isinstance(e, TimeoutError):  # socket.timeout is TimeoutError
        return f"no answer within {timeout:g} s"
    if isinstance(e, ConnectionResetError):
        return "the connection was reset"
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


class WebSocket:
    def __init__(self, url: str, timeout: float = 600.0, connect_timeout: float = CONNECT_TIMEOUT):
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("ws", "http"):
            raise ClientError(f"{url}: only plain ws:// / http:// servers are supported")
        # the handshake too gets the short timeout: a port that speaks another protocol may never answer it
        self.sock = socket.create_connection((u.hostname, u.port or 80), timeout=min(timeout, connect_timeout))
        try:
            self._handshake(u)
        except BaseException:
            self.sock.close()
            raise
        self.sock.settimeout(timeout)

    def _handshake(self, u: urllib.parse.SplitResult):
        key = base64.b64encode(os.urandom(16)).decode()
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        request = (f"GET {path} HTTP/1.1\r\nHost: {u.hostname}:{u.port or 80}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(request.encode())
        self._buf = b""
        head = self._read_until(b"\r\n\r\n").decode("latin-1")
        status = head.split("\r\n", 1)[0]
        if " 101 " not in status + " ":
            raise ClientError(f"its websocket {u.path} answered {status!r}, not 101 Switching Protocols; is it ComfyUI?")
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in head.split("\r\n")[1:] if line)}
        expected = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        if headers.get("sec-websocket-accept") != expected:
            raise ClientError(f"its websocket {u.path} answered with a wrong Sec-WebSocket-Accept; is it ComfyUI?")

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection during the websocket handshake")
            self._buf += chunk
        head, _, self._buf = self._buf.partition(marker)
        return head

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self._buf)))
            if not chunk:
                raise ConnectionError("the server closed the connection")
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
    """An API-format workflow (``{node id: {"class_type", "inputs"}}``) from a JSON file; also accepted: the
    body of a ``POST /prompt`` (``{"prompt": {...}}``). ClientError naming the file for anything else."""
    export = "export it from ComfyUI with Workflow > Export (API) (or use the copy in example_workflows/api/)"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ClientError(f"{path}: no such file; give the path of a workflow saved in API format") from None
    except IsADirectoryError:
        raise ClientError(f"{path}: a folder, not a workflow file; give the path of a .json workflow") from None
    except OSError as e:
        raise ClientError(f"{path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ClientError(f"{path}: not a text file, so not a workflow; {export}") from None
    except ValueError as e:  # json.JSONDecodeError
        raise ClientError(f"{path}: not valid JSON ({e}); {export}") from None
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        data = data["prompt"]
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise ClientError(f"{path} is an editor workflow, not the API format; {export}")
    if not isinstance(data, dict) or not data or \
            not all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        raise ClientError(f"{path}: not an API-format workflow (a JSON object of nodes, each with a class_type); "
                          f"{export}")
    return data


class ComfyClient:
    def __init__(self, server: str, timeout: float = 600.0):
        self.server = server_url(server)
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex
        self.prompt_id = None  # set once the server has queued the workflow
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
            raise self._unreachable(e.reason if isinstance(e.reason, BaseException) else e) from None
        except OSError as e:  # a timeout or reset while reading the answer
            raise self._unreachable(e) from None
        except http.client.HTTPException as e:
            raise ClientError(f"{self.server} does not answer like an HTTP server ({type(e).__name__}); "
                              f"is that ComfyUI's address?") from None

    def _unreachable(self, e: BaseException, timeout: float | None = None) -> ClientError:
        why = connection_problem(e, self.timeout if timeout is None else timeout)
        if self.prompt_id is not None:
            return ClientError(f"lost ComfyUI at {self.server} ({why}) while it ran prompt {self.prompt_id}; if the "
                               f"server is still up the prompt may still be running there")
        return ClientError(f"cannot reach ComfyUI at {self.server} ({why}); start ComfyUI there or pass "
                           f"--server http://HOST:PORT")

    def submit(self, prompt: dict) -> str:
        status, body = self._http("/prompt", {"prompt": prompt, "client_id": self.client_id})
        try:
            answer = json.loads(body)
        except ValueError:
            answer = {"error": body[:500].decode("utf-8", "replace")}
        if status != 200:
            raise ClientError("ComfyUI refused the workflow:\n" + format_refusal(answer, prompt))
        if not isinstance(answer, dict) or "prompt_id" not in answer:
            raise ClientError(f"{self.server} answered POST /prompt without a prompt_id; is that ComfyUI's address?")
        return answer["prompt_id"]

    def run(self, prompt: dict, output_dir: str, log=print) -> dict:
        """Submit, follow, download. Returns ``{"prompt_id", "status", "files": [paths]}``."""
        ws_url = self.server.replace("http://", "ws://", 1) + f"/ws?clientId={self.client_id}"
        try:
            ws = WebSocket(ws_url, timeout=self.timeout)
        except OSError as e:
            raise self._unreachable(e, min(self.timeout, CONNECT_TIMEOUT)) from None
        except ClientError as e:
            raise ClientError(f"{self.server}: {e}") from None
        try:
            self.prompt_id = prompt_id = self.submit(prompt)
            log(f"queued {prompt_id} ({len(prompt)} nodes)")
            error = self._follow(ws, prompt_id, prompt, log)
        except OSError as e:
            raise self._unreachable(e) from None
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
            try:
                entry = json.loads(body).get(prompt_id) if status == 200 else None
            except (ValueError, AttributeError):
                entry = None
            if entry and entry.get("status", {}).get("completed") is not None or time.monotonic() > deadline:
                return entry or {}
            time.sleep(0.05)

    def _follow(self, ws: WebSocket, prompt_id: str, prompt: dict, log):
        def title(node):
            return f"{node} {prompt.get(str(node), {}).get('class_type', '')}".strip()

        while True:
            msg = ws.recv()
            if msg is None:
                raise ClientError(f"ComfyUI at {self.server} closed the websocket before prompt {prompt_id} finished; "
                                  f"see the server's log")
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
            elif kind == "execution_error":  # returned, not logged: the caller prints it once
                # a custom node's exception type starts with its pack's path (ComfyUI imports packs by path)
                exception = str(data.get("exception_type", "")).rsplit(".", 1)[-1]
                return (f"{title(data.get('node_id'))} failed: {exception}: "
                        f"{str(data.get('exception_message', '')).strip()}")
            elif kind == "execution_interrupted":
                return f"prompt {prompt_id} was interrupted on the server (Cancel in ComfyUI, or POST /interrupt)"
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
                    try:
                        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                        with open(path, "wb") as f:
                            f.write(body)
                    except OSError as e:
                        raise ClientError(f"cannot write {path} ({e.strerror or e}); pass --output-dir DIR with a "
                                          f"folder you can write to") from None
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
