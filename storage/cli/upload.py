"""``storage-proxy-upload URL FILE``: a resumable tus upload with progress.

URL is either an upload that exists (Backend.AI: ``…/upload?token=…`` from the
manager) or a tus creation endpoint.  Running the same command again after a
failure resumes from the server's offset.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from storage.cli.progress import ProgressDisplay
from storage.cli.running import Failed, run
from storage.tus_client import RetryPolicy, TusClient, parse_size
from storage.tus_client.sources import StreamSource

STDIN_CHUNK = 8 << 20


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _metadata(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or any(c in key for c in " ,") or not key.isascii():
        raise argparse.ArgumentTypeError(f"expected key=value (ASCII key, no spaces or commas): {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="storage-proxy-upload",
        description="Upload FILE with the tus protocol to URL (an upload URL, or a tus "
                    "creation endpoint); run it again to resume an interrupted upload.")
    parser.add_argument("url", metavar="URL")
    parser.add_argument("file", metavar="FILE", help="the file to upload, or - for stdin (with --size)")
    parser.add_argument("--chunk-size", type=_size, default=None, metavar="SIZE",
                        help="bytes per PATCH, e.g. 64m (default: the whole file in one PATCH; "
                             "8m for stdin, which keeps one chunk in memory to resume)")
    parser.add_argument("--parallel", type=_positive, default=1, metavar="N",
                        help="N partial uploads at once, joined at the end (needs the "
                             "server's concatenation extension; sequential otherwise)")
    parser.add_argument("--checksum", choices=["sha256", "sha1", "md5", "auto"], default=None,
                        help="send a checksum with every PATCH if the server supports it")
    parser.add_argument("--require-checksum", action="store_true",
                        help="fail instead of uploading without checksums")
    parser.add_argument("--retries", type=_non_negative, default=5, metavar="N",
                        help="retries in a row without progress before giving up (default 5)")
    parser.add_argument("--metadata", type=_metadata, nargs="+", default=[], metavar="KEY=VALUE",
                        help="Upload-Metadata for a created upload (filename= is added)")
    parser.add_argument("--size", type=_non_negative, default=None,
                        help="the number of bytes on stdin, with FILE -")
    parser.add_argument("--create", action="store_true",
                        help="always create a new upload at URL (default: only when URL is "
                             "not an upload and the server offers creation)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.file == "-" and args.size is None:
        parser.error("uploading stdin needs --size")

    async def operation(reactor: Any) -> None:
        chunk_size = args.chunk_size
        if args.file == "-":
            # stdin cannot seek: PATCHes no larger than what it keeps to rewind
            # make every interruption resumable
            chunk_size = chunk_size or STDIN_CHUNK
            data: Any = StreamSource(sys.stdin.buffer, args.size, reactor, rewind=chunk_size)
            name = "stdin"
        else:
            if not os.path.isfile(args.file):
                raise Failed(f"not a readable file: {args.file}")
            data, name = args.file, os.path.basename(args.file)
        metadata = dict(args.metadata)
        metadata.setdefault("filename", name)
        display = ProgressDisplay(sys.stderr, f"upload {name}", sys.stderr.isatty(),
                                  reactor.seconds)
        client = TusClient(
            reactor, chunk_size=chunk_size, parallel=args.parallel,
            checksum=args.checksum, require_checksum=args.require_checksum,
            retry=RetryPolicy(retries=args.retries))
        rates = [0.0]

        def progress(p: Any) -> None:
            rates[0] = p.rate or rates[0]
            if not args.quiet:
                display.update(p.sent, p.total, p.rate)

        try:
            result = await client.upload(args.url, data, metadata=metadata,
                                         create=True if args.create else None,
                                         on_progress=progress)
        finally:
            await client.close()
        if not args.quiet:
            display.update(result.size, result.size, rates[0], final=True)
            display.message(f"uploaded {result.size} bytes"
                            + (f" with {result.checksum_algorithm} checksums"
                               if result.checksum_algorithm else "")
                            + (f" in {len(result.partial_urls)} parts"
                               if result.partial_urls else ""))
        sys.stdout.write(result.url + "\n")
        sys.stdout.flush()

    run(operation, "upload failed")


if __name__ == "__main__":
    main()
