"""A local Batch-API-compatible server for tests: :class:`~tests.openai_fake.FakeOpenAI`'s chat
completions plus ``/v1/files`` (upload, retrieve, content) and ``/v1/batches`` (create,
retrieve, list, cancel).

A batch stays ``in_progress`` for ``polls_to_complete`` retrieves (forever while ``hold`` is
set), then finishes: each line is answered with the same reply hook, usage and model as the
online endpoint, so online and batch runs see the same replies. Faults are injected per item
(``expire(custom_id, submission)``, ``fail_item(custom_id, submission)``, a 400 for a
``response_format`` in ``reject_formats``), per batch (``fail_batch(batch_index)``) and for
every call (``reject_key``: 401). Every submission of every ``custom_id`` is counted in
``submissions``, so a test can prove nothing was submitted twice.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any, ClassVar

from tests.openai_fake import FakeOpenAI, _error, _handler, _Server

ItemFault = Callable[[str, int], bool]


@dataclass
class FakeBatchAPI(FakeOpenAI):
    polls_to_complete: int = 1
    hold: bool = False
    expire: ItemFault | None = None
    fail_item: ItemFault | None = None
    fail_batch: Callable[[int], bool] | None = None
    #: answer every files and batches call with 401, as a provider does for a bad key
    reject_key: bool = False

    submissions: Counter[str] = field(default_factory=Counter, init=False)
    batch_sizes: list[int] = field(default_factory=list, init=False)
    polls: int = field(default=0, init=False)
    files: dict[str, bytes] = field(default_factory=dict, init=False)
    batches: dict[str, dict[str, Any]] = field(default_factory=dict, init=False)

    thread_name: ClassVar[str] = "fake-batch"

    def _make_server(self) -> ThreadingHTTPServer:
        return _Server(("127.0.0.1", 0), _batch_handler(self))

    # ------------------------------------------------------------------ files

    def add_file(self, data: bytes, purpose: str, filename: str) -> dict[str, Any]:
        with self._lock:
            file_id = f"file-{len(self.files)}"
            self.files[file_id] = data
        return {"id": file_id, "object": "file", "bytes": len(data), "created_at": 0,
                "filename": filename, "purpose": purpose, "status": "processed"}

    # ------------------------------------------------------------------ batches

    def create_batch(self, request: dict[str, Any]) -> dict[str, Any] | None:
        data = self.files.get(str(request.get("input_file_id")))
        if data is None:
            return None
        lines = [json.loads(line) for line in data.splitlines() if line.strip()]
        with self._lock:
            index = len(self.batches)
            batch_id = f"batch_{index}"
            tries = [self.submissions[line["custom_id"]] for line in lines]
            self.submissions.update(line["custom_id"] for line in lines)
            self.batch_sizes.append(len(lines))
            self.batches[batch_id] = {
                "id": batch_id, "object": "batch", "endpoint": request.get("endpoint"),
                "input_file_id": request["input_file_id"], "completion_window": request.get("completion_window"),
                "status": "in_progress", "created_at": index, "metadata": request.get("metadata"),
                "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
                "_lines": lines, "_tries": tries, "_index": index, "_polls": 0}
        return self._public(batch_id)

    def retrieve(self, batch_id: str) -> dict[str, Any] | None:
        with self._lock:
            batch = self.batches.get(batch_id)
            if batch is None:
                return None
            self.polls += 1
            batch["_polls"] += 1
            due = batch["status"] == "in_progress" and not self.hold and batch["_polls"] > self.polls_to_complete
        if due:
            self._finish(batch)
        return self._public(batch_id)

    def cancel(self, batch_id: str) -> dict[str, Any] | None:
        with self._lock:
            batch = self.batches.get(batch_id)
            if batch is None:
                return None
            if batch["status"] == "in_progress":
                batch["status"] = "cancelled"
                errors = [_error_line(line["custom_id"], "batch_cancelled", "the batch was cancelled")
                          for line in batch["_lines"]]
                batch["error_file_id"] = self._store_lines(errors)
        return self._public(batch_id)

    def _finish(self, batch: dict[str, Any]) -> None:
        if self.fail_batch is not None and self.fail_batch(batch["_index"]):
            with self._lock:
                batch.update(status="failed", errors={"object": "list", "data": [
                    {"code": "injected_failure", "message": "the whole batch failed (injected)"}]})
            return
        out, errors = [], []
        for line, tries in zip(batch["_lines"], batch["_tries"], strict=True):
            cid, body = line["custom_id"], line["body"]
            fmt = (body.get("response_format") or {}).get("type")
            if fmt in self.reject_formats:  # as the online endpoint does, per item
                errors.append({"id": f"req-{cid[:8]}", "custom_id": cid, "error": None,
                               "response": {"status_code": 400, "request_id": "r", "body": _error(
                                   f"Invalid parameter: 'response_format' of type '{fmt}' is not supported.",
                                   "invalid_request_error", "response_format")}})
            elif self.expire is not None and self.expire(cid, tries):
                errors.append(_error_line(cid, "batch_expired", "the batch expired before this request ran"))
            elif self.fail_item is not None and self.fail_item(cid, tries):
                errors.append({"id": f"req-{cid[:8]}", "custom_id": cid, "error": None,
                               "response": {"status_code": 500, "request_id": "r",
                                            "body": _error("The server had an error", "server_error")}})
            else:
                with self._lock:
                    self.bodies.append(body)
                out.append({"id": f"req-{cid[:8]}", "custom_id": cid, "error": None,
                            "response": {"status_code": 200, "request_id": "r",
                                         "body": self.completion(body, self.reply(body))}})
        with self._lock:
            batch["status"] = "expired" if any(e["error"] for e in errors) else "completed"
            batch["request_counts"] = {"total": len(batch["_lines"]), "completed": len(out), "failed": len(errors)}
            batch["output_file_id"] = self._store_lines(out) if out else None
            batch["error_file_id"] = self._store_lines(errors) if errors else None

    def _store_lines(self, rows: list[dict[str, Any]]) -> str:
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        file_id = f"file-{len(self.files)}"
        self.files[file_id] = data
        return file_id

    def _public(self, batch_id: str) -> dict[str, Any]:
        with self._lock:
            return {k: v for k, v in self.batches[batch_id].items() if not k.startswith("_")}

    def listing(self) -> dict[str, Any]:
        ids = sorted(self.batches, key=lambda b: -self.batches[b]["_index"])  # newest first, as OpenAI
        return {"object": "list", "data": [self._public(b) for b in ids], "has_more": False,
                "first_id": ids[0] if ids else None, "last_id": ids[-1] if ids else None}


def _error_line(custom_id: str, code: str, message: str) -> dict[str, Any]:
    return {"id": f"req-{custom_id[:8]}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


def _multipart(content_type: str, raw: bytes) -> dict[str, tuple[str, bytes]]:
    """name -> (filename, bytes) of a multipart/form-data body."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
    out: dict[str, tuple[str, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        out[str(name)] = (str(part.get_filename() or ""), payload if isinstance(payload, bytes) else b"")
    return out


def _batch_handler(fake: FakeBatchAPI) -> type:
    base = _handler(fake)

    class Handler(base):  # type: ignore[misc, valid-type]
        def _refused(self, parts: list[str]) -> bool:
            if fake.reject_key and parts[1:2] in (["files"], ["batches"]):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._send(401, _error("Incorrect API key provided", "invalid_request_error"))
                return True
            return False

        def do_GET(self) -> None:
            parts = self.path.split("?")[0].strip("/").split("/")  # ["v1", "batches", id, ...]
            if self._refused(parts):
                return
            if parts[1:2] == ["files"] and len(parts) == 4 and parts[3] == "content":
                data = fake.files.get(parts[2])
                if data is None:
                    self._send(404, _error("no such file", "invalid_request_error"))
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            elif parts[1:2] == ["batches"] and len(parts) == 2:
                self._send(200, fake.listing())
            elif parts[1:2] == ["batches"] and len(parts) == 3:
                self._found(fake.retrieve(parts[2]))
            else:
                super().do_GET()

        def do_POST(self) -> None:
            parts = self.path.split("?")[0].strip("/").split("/")
            if self._refused(parts):
                return
            if parts[1:] == ["files"]:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                form = _multipart(self.headers.get("Content-Type", ""), raw)
                name, data = form.get("file", ("", b""))
                self._send(200, fake.add_file(data, form.get("purpose", ("", b"batch"))[1].decode(), name))
            elif parts[1:] == ["batches"]:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._found(fake.create_batch(json.loads(raw)))
            elif parts[1:2] == ["batches"] and parts[3:] == ["cancel"]:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._found(fake.cancel(parts[2]))
            else:
                super().do_POST()

        def _found(self, payload: dict[str, Any] | None) -> None:
            if payload is None:
                self._send(404, _error("not found", "invalid_request_error"))
            else:
                self._send(200, payload)

    return Handler


__all__ = ["FakeBatchAPI"]
