"""A local HuggingFace hub: the documented HTTP API ``huggingface_hub`` and the importer use.

No hub is reachable from the test machines, so the HuggingFace registry is
tested only against this contract server.  It serves, from real files named
in a JSON manifest:

* ``GET /api/models`` (``search``, ``sort``, ``limit``; newest/largest first)
* ``GET /api/models/{id}`` and ``/api/models/{id}/revision/{rev}`` (model info;
  404 with ``X-Error-Code: RepoNotFound`` / ``RevisionNotFound``)
* ``GET /api/models/{id}/refs`` (branches and tags)
* ``GET /api/models/{id}/tree/{rev}?recursive=true`` (files with ``oid``, ``size``, ``lfs``)
* ``GET``/``HEAD /{id}/resolve/{rev}/{path}``: the bytes, ``Range`` (one range),
  ``ETag`` (the git blob id), ``X-Linked-Etag``/``X-Linked-Size`` for LFS files
  (the sha256), ``X-Repo-Commit``, ``Accept-Ranges: bytes``.

Faults: ``POST /_faults`` ``{"path": "file.bin", "drop_after": N, "times": k}``
makes the next ``k`` downloads of that file stop after ``N`` bytes of the body
(the connection closes short of its Content-Length; with ``"stall": true`` it
stays open and sends nothing more).  ``GET /_stats`` counts
downloads, ranged requests (from an offset) and ``parts`` (bounded ranges) per path.
``POST /_throttle`` ``{"rate": bytes_per_second}`` paces every download (0: off),
as a CDN caps one connection.

Manifest: ``{"org/name": {"author", "tags", "created", "modified", "downloads",
"likes", "gated", "revisions": {"main": {"sha": "...", "files": {"path":
{"file": "/abs/path", "lfs": true}}}}, "tags_refs": {"v1": "main"}}}``.

Run: ``python hub.py MANIFEST PORTFILE`` (listens on 127.0.0.1, writes its port).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from klein import Klein
from twisted.internet import endpoints, reactor
from twisted.internet.defer import Deferred
from twisted.web.server import Site


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Hub:
    app = Klein()

    def __init__(self, manifest: dict[str, Any]) -> None:
        self.repos = manifest
        self.faults: dict[str, dict[str, int]] = {}
        self.stats: dict[str, dict[str, int]] = {}
        self.rate = 0  # bytes/s per download, as a CDN caps one connection (0: as fast as it goes)
        self._meta: dict[str, dict[str, Any]] = {}

    # -- helpers ---------------------------------------------------------------

    def _file_meta(self, spec: dict[str, Any]) -> dict[str, Any]:
        path = spec["file"]
        meta = self._meta.get(path)
        if meta is None:
            data = Path(path).read_bytes()
            meta = self._meta[path] = {"size": len(data), "oid": git_blob_id(data),
                                       "sha256": hashlib.sha256(data).hexdigest()}
        return meta

    def _not_found(self, request: Any, code: str, message: str) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"X-Error-Code", code.encode())
        request.setHeader(b"X-Error-Message", message.encode())
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"error": message}).encode()

    def _json(self, request: Any, body: Any) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(body).encode()

    def _revision(self, repo: dict[str, Any], rev: str) -> dict[str, Any] | None:
        revs = repo["revisions"]
        if rev in revs:
            return revs[rev]
        target = repo.get("tags_refs", {}).get(rev)
        if target:
            return revs[target]
        for r in revs.values():
            if r["sha"] == rev:
                return r
        return None

    def _info(self, model_id: str, repo: dict[str, Any], rev: dict[str, Any] | None) -> dict[str, Any]:
        info = {
            "id": model_id, "author": repo.get("author"), "tags": repo.get("tags", []),
            "createdAt": repo.get("created"), "lastModified": repo.get("modified"),
            "downloads": repo.get("downloads", 0), "likes": repo.get("likes", 0),
            "gated": repo.get("gated", False), "private": False,
        }
        if rev is not None:
            info["sha"] = rev["sha"]
            info["siblings"] = [{"rfilename": p} for p in sorted(rev["files"])]
        return info

    # -- the API ---------------------------------------------------------------

    @app.route("/api/models", methods=["GET"])
    def list_models(self, request: Any) -> bytes:
        args = {k.decode(): v[0].decode() for k, v in request.args.items()}
        search = args.get("search")
        sort = args.get("sort", "downloads")
        limit = int(args.get("limit", "1000"))
        ids = [m for m in self.repos if not search or search.lower() in m.lower()]
        key = {"downloads": "downloads", "likes": "likes", "createdAt": "created",
               "lastModified": "modified", "trendingScore": "likes"}.get(sort, "downloads")
        ids.sort(key=lambda m: self.repos[m].get(key) or 0, reverse=True)
        return self._json(request, [self._info(m, self.repos[m], None) for m in ids[:limit]])

    def _repo(self, request: Any, org: str, name: str) -> tuple[str, dict[str, Any] | None]:
        model_id = f"{org}/{name}"
        return model_id, self.repos.get(model_id)

    @app.route("/api/models/<org>/<name>", methods=["GET"])
    def model_info(self, request: Any, org: str, name: str) -> bytes:
        return self.model_info_rev(request, org, name, "main")

    @app.route("/api/models/<org>/<name>/revision/<rev>", methods=["GET"])
    def model_info_rev(self, request: Any, org: str, name: str, rev: str) -> bytes:
        model_id, repo = self._repo(request, org, name)
        if repo is None:
            return self._not_found(request, "RepoNotFound", "Repository not found")
        revision = self._revision(repo, rev)
        if revision is None:
            return self._not_found(request, "RevisionNotFound", "Invalid rev id")
        return self._json(request, self._info(model_id, repo, revision))

    @app.route("/api/models/<org>/<name>/refs", methods=["GET"])
    def refs(self, request: Any, org: str, name: str) -> bytes:
        _, repo = self._repo(request, org, name)
        if repo is None:
            return self._not_found(request, "RepoNotFound", "Repository not found")
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": r["sha"]} for b, r in repo["revisions"].items()]
        tags = [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": repo["revisions"][b]["sha"]}
                for t, b in repo.get("tags_refs", {}).items()]
        return self._json(request, {"branches": branches, "tags": tags, "converts": []})

    @app.route("/api/models/<org>/<name>/tree/<rev>", methods=["GET"])
    def tree(self, request: Any, org: str, name: str, rev: str) -> bytes:
        _, repo = self._repo(request, org, name)
        if repo is None:
            return self._not_found(request, "RepoNotFound", "Repository not found")
        revision = self._revision(repo, rev)
        if revision is None:
            return self._not_found(request, "RevisionNotFound", "Invalid rev id")
        entries: list[dict[str, Any]] = []
        dirs: set[str] = set()
        for path, spec in sorted(revision["files"].items()):
            parts = path.split("/")
            for i in range(1, len(parts)):
                dirs.add("/".join(parts[:i]))
            meta = self._file_meta(spec)
            entry: dict[str, Any] = {"type": "file", "path": path, "size": meta["size"], "oid": meta["oid"]}
            if spec.get("lfs"):
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{meta['sha256']}\nsize {meta['size']}\n"
                entry["oid"] = git_blob_id(pointer.encode())
                entry["lfs"] = {"oid": meta["sha256"], "size": meta["size"], "pointerSize": len(pointer)}
            entries.append(entry)
        for d in sorted(dirs):
            entries.append({"type": "directory", "path": d, "size": 0, "oid": hashlib.sha1(d.encode()).hexdigest()})
        return self._json(request, entries)

    @app.route("/<org>/<name>/resolve/<rev>/<path:filepath>", methods=["GET", "HEAD"])
    def resolve(self, request: Any, org: str, name: str, rev: str, filepath: str) -> bytes:
        _, repo = self._repo(request, org, name)
        if repo is None:
            return self._not_found(request, "RepoNotFound", "Repository not found")
        revision = self._revision(repo, rev)
        if revision is None:
            return self._not_found(request, "RevisionNotFound", "Invalid rev id")
        spec = revision["files"].get(filepath)
        if spec is None:
            return self._not_found(request, "EntryNotFound", "Entry not found")
        meta = self._file_meta(spec)
        data = Path(spec["file"]).read_bytes()
        request.setHeader(b"X-Repo-Commit", revision["sha"].encode())
        request.setHeader(b"Accept-Ranges", b"bytes")
        if spec.get("lfs"):
            request.setHeader(b"X-Linked-Etag", f'"{meta["sha256"]}"'.encode())
            request.setHeader(b"X-Linked-Size", str(meta["size"]).encode())
            request.setHeader(b"ETag", f'"{meta["sha256"]}"'.encode())
        else:
            request.setHeader(b"ETag", f'"{meta["oid"]}"'.encode())
        request.setHeader(b"Content-Type", b"application/octet-stream")
        start, end, bounded = 0, len(data), False
        rng = request.getHeader(b"Range")
        if rng and rng.startswith(b"bytes=") and b"," not in rng:
            first, _, last = rng[6:].decode().partition("-")
            start = int(first) if first else 0
            end = min(int(last) + 1, len(data)) if last else len(data)
            bounded = bool(last)
            if start >= len(data):
                request.setResponseCode(416)
                request.setHeader(b"Content-Range", f"bytes */{len(data)}".encode())
                return b""
            request.setResponseCode(206)
            request.setHeader(b"Content-Range", f"bytes {start}-{end - 1}/{len(data)}".encode())
        body = data[start:end]
        request.setHeader(b"Content-Length", str(len(body)).encode())
        if request.method == b"HEAD":
            return b""
        stats = self.stats.setdefault(filepath, {"gets": 0, "ranged": 0})
        stats["gets"] += 1
        stats["ranged"] += 1 if start else 0
        if bounded:  # a bounded range: one part of a ranged download
            stats["parts"] = stats.get("parts", 0) + 1
        fault = self.faults.get(filepath)
        if fault and fault["times"] > 0 and len(body) > fault["drop_after"]:
            fault["times"] -= 1
            request.write(body[:fault["drop_after"]])
            if fault.get("stall"):
                return Deferred()  # type: ignore[return-value]  # the rest never comes
            # Short of Content-Length.  (loseConnection waits for the channel, a
            # registered producer; the bytes written are flushed well within 0.1 s.)
            reactor.callLater(0.1, request.channel.transport.abortConnection)  # type: ignore[attr-defined]
            return Deferred()  # type: ignore[return-value]  # never answered: Klein cancels it
        if self.rate:
            return self._paced(request, body)  # type: ignore[return-value]
        return body

    def _paced(self, request: Any, body: bytes) -> Deferred[bytes]:
        """``body`` at ``rate`` bytes/s, in 64 KiB writes; stops if the client goes."""
        done: Deferred[bytes] = Deferred()
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        chunk = 64 << 10

        def step(pos: int) -> None:
            if gone:
                return
            if pos >= len(body):
                done.callback(b"")
                return
            request.write(body[pos:pos + chunk])
            reactor.callLater(chunk / self.rate, step, pos + chunk)  # type: ignore[attr-defined]

        step(0)
        return done

    @app.route("/_throttle", methods=["POST"])
    def set_throttle(self, request: Any) -> bytes:
        self.rate = int(json.loads(request.content.read())["rate"])
        return self._json(request, {"rate": self.rate})

    @app.route("/_faults", methods=["POST"])
    def set_fault(self, request: Any) -> bytes:
        spec = json.loads(request.content.read())
        self.faults[spec["path"]] = {"drop_after": int(spec["drop_after"]), "times": int(spec.get("times", 1)),
                                     "stall": int(bool(spec.get("stall")))}
        return self._json(request, {"ok": True})

    @app.route("/_stats", methods=["GET"])
    def get_stats(self, request: Any) -> bytes:
        return self._json(request, self.stats)


def main() -> None:
    manifest = json.loads(Path(sys.argv[1]).read_text())
    portfile = Path(sys.argv[2])
    hub = Hub(manifest)
    endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")

    def listening(port: Any) -> None:
        tmp = portfile.with_suffix(".tmp")
        tmp.write_text(str(port.getHost().port))
        tmp.rename(portfile)

    endpoint.listen(Site(hub.app.resource())).addCallback(listening)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
